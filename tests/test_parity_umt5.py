"""umT5 text encoding through OUR loader (files in each layout, tokenizer from local files) against
transformers' UMT5EncoderModel run directly."""
import shutil

import pytest
import torch
from safetensors.torch import save_file
from transformers import AutoTokenizer, UMT5Config, UMT5EncoderModel

from comfyui_spacetime.model_defs.checkpoint import CheckpointError
from comfyui_spacetime.model_defs.text_encoders import minilm_dir
from comfyui_spacetime.model_defs.umt5 import UMT5_TOKENIZER_FILES, UMT5TextEncoder

PROMPTS = ["a red circle drifts to the left", "two small blue squares bounce over a grey background, slowly"]


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    # No umT5 tokenizer ships offline; any fast tokenizer exercises the same loading and padding path,
    # so the built-in MiniLM's files stand in for google/umt5-xxl's.
    folder = tmp_path_factory.mktemp("umt5-xxl")
    for name in UMT5_TOKENIZER_FILES + ("vocab.txt",):
        shutil.copy(minilm_dir() / name, folder / name)
    return folder


@pytest.fixture(scope="module")
def reference():
    torch.manual_seed(0)
    config = UMT5Config(vocab_size=30522, d_model=32, d_kv=8, d_ff=48, num_layers=2, num_heads=4, feed_forward_proj="gated-gelu")
    return UMT5EncoderModel(config).eval()


@pytest.mark.parametrize("layout", ["tied-stored-twice", "tied-stored-once", "prefixed"])
def test_encoding_matches_transformers(reference, tokenizer_dir, tmp_path, layout):
    state_dict = {k: v.clone().contiguous() for k, v in reference.state_dict().items()}
    if layout != "tied-stored-twice":  # transformers' own save and ComfyUI's file keep the tied embedding once
        state_dict.pop("encoder.embed_tokens.weight")
    if layout == "prefixed":
        state_dict = {"model." + k: v for k, v in state_dict.items()}
    path = tmp_path / "umt5.safetensors"
    save_file(state_dict, path)
    ours = UMT5TextEncoder(path, tokenizer_dir, torch.float32)
    encoded = ours.encode(PROMPTS, text_len=40)

    tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    for row, prompt in enumerate(PROMPTS):
        ids = tokenizer(prompt, return_tensors="pt")["input_ids"]
        with torch.no_grad():
            expected = reference(input_ids=ids).last_hidden_state[0]  # the prompt alone, no padding
        n = ids.shape[1]
        assert encoded.mask[row].sum() == n
        assert (encoded.embeddings[row, :n] - expected).abs().max().item() <= 1e-5
        assert encoded.embeddings[row, n:].abs().max() == 0  # zero past the prompt, as Wan pads
    assert encoded.embeddings.shape == (2, 40, 32)


def test_missing_tokenizer_file_is_named(reference, tokenizer_dir, tmp_path):
    path = tmp_path / "umt5.safetensors"
    save_file({k: v.contiguous() for k, v in reference.state_dict().items() if k != "encoder.embed_tokens.weight"}, path)
    partial = tmp_path / "tok"
    shutil.copytree(tokenizer_dir, partial)
    (partial / "tokenizer.json").unlink()
    with pytest.raises(FileNotFoundError, match=r"umT5 tokenizer is missing \['tokenizer.json'\].*google/umt5-xxl"):
        UMT5TextEncoder(path, partial, torch.float32)


def test_wrong_family_and_pickle(tokenizer_dir, tmp_path):
    vae_like = tmp_path / "wan_2.1_vae.safetensors"
    save_file({"encoder.conv1.weight": torch.zeros(2, 3, 3, 3, 3)}, vae_like)
    with pytest.raises(CheckpointError, match=r"wan_2.1_vae.safetensors is not a umT5 text encoder checkpoint: it holds a Wan VAE"):
        UMT5TextEncoder(vae_like, tokenizer_dir, torch.float32)
    pth = tmp_path / "models_t5_umt5-xxl-enc-bf16.pth"
    pth.write_bytes(b"pickle")
    with pytest.raises(CheckpointError, match=r"pickle-based files .* are refused"):
        UMT5TextEncoder(pth, tokenizer_dir, torch.float32)


def test_scaled_fp8_file_is_dequantized(reference, tokenizer_dir, tmp_path):
    """ComfyUI's umt5_xxl_fp8_e4m3fn_scaled layout: fp8 Linear weights with a per-layer scale."""
    state, dequantized = {}, {}
    for key, value in reference.state_dict().items():
        if key == "encoder.embed_tokens.weight":
            continue
        if key.endswith(("q.weight", "k.weight", "v.weight", "o.weight", "wi_0.weight", "wi_1.weight", "wo.weight")):
            scale = value.abs().max() / 448
            state[key] = (value / scale).to(torch.float8_e4m3fn)
            state[key[: -len("weight")] + "scale_weight"] = scale.reshape(1)
            dequantized[key] = state[key].float() * scale
        else:
            state[key] = dequantized[key] = value.clone().contiguous()
    state["scaled_fp8"] = torch.zeros(0, dtype=torch.float8_e4m3fn)
    path = tmp_path / "umt5_fp8_scaled.safetensors"
    save_file(state, path)
    ours = UMT5TextEncoder(path, tokenizer_dir, torch.float32)
    expected_model = UMT5EncoderModel(reference.config).eval()
    expected_model.load_state_dict(dequantized, strict=False)
    expected_model.encoder.embed_tokens = expected_model.shared
    ids = AutoTokenizer.from_pretrained(str(tokenizer_dir))(PROMPTS[0], return_tensors="pt")["input_ids"]
    with torch.no_grad():
        expected = expected_model(input_ids=ids).last_hidden_state[0]
    got = ours.encode(PROMPTS[:1], text_len=20).embeddings[0, : ids.shape[1]]
    assert (got - expected).abs().max().item() <= 1e-5
