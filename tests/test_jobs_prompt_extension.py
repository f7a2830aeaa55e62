"""Prompt extension: a tiny random-weight causal LM built here (real tokenizer files, the real generate path) and
a loopback OpenAI-compatible server of our own; no network."""
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from comfyui_spacetime.jobs.prompt_extension import SYSTEM_PROMPTS, extend_endpoint, extend_local, finish
from comfyui_spacetime.nodes.prompt import SpacetimeExtendPrompt

WORDS = "a red blue ball cube rolls moves left right over the grey background slowly camera light . , shot".split()
CHAT_TEMPLATE = "{% for m in messages %}<|{{ m['role'] }}|> {{ m['content'] }} {% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}"


@pytest.fixture(scope="module")
def tiny_llm(tmp_path_factory):
    """models/LLM/tiny-qwen: a 2-layer Qwen2 with random weights and a word-level tokenizer, saved as files."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

    root = tmp_path_factory.mktemp("models")
    folder = root / "LLM" / "tiny-qwen"
    specials = ["<unk>", "<pad>", "<eos>", "<|system|>", "<|user|>", "<|assistant|>"]
    # a byte-level BPE, as Qwen's, trained here on a few sentences of our words
    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    corpus = [" ".join(WORDS[i:] + WORDS[:i]) for i in range(len(WORDS))]
    tok.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=300, special_tokens=specials,
                                                        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    vocab = tok.get_vocab()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", pad_token="<pad>", eos_token="<eos>",
                                        additional_special_tokens=specials[3:])
    tokenizer.chat_template = CHAT_TEMPLATE
    tokenizer.save_pretrained(folder)
    config = Qwen2Config(vocab_size=len(vocab), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, max_position_embeddings=512, eos_token_id=vocab["<eos>"], pad_token_id=vocab["<pad>"])
    torch.manual_seed(0)
    Qwen2ForCausalLM(config).save_pretrained(folder, safe_serialization=True)
    return root


def test_local_model_is_deterministic_for_a_seed_and_says_when_it_truncates(tiny_llm):
    folder = tiny_llm / "LLM" / "tiny-qwen"
    first = extend_local(folder, "a red ball rolls left", "t2v", seed=7, max_new_tokens=12)
    again = extend_local(folder, "a red ball rolls left", "t2v", seed=7, max_new_tokens=12)
    other = extend_local(folder, "a red ball rolls left", "t2v", seed=8, max_new_tokens=12)
    assert first == again and first.prompt != other.prompt and first.prompt.strip()
    assert "<|" not in first.prompt  # special tokens are not part of the answer
    if first.note:  # a random model rarely says <eos>: then it ran to the limit, and the note says so
        assert "max_new_tokens=12" in first.note


def test_node_runs_the_local_model_from_the_models_folder(tiny_llm, monkeypatch):
    monkeypatch.setenv("SPACETIME_MODELS_DIR", str(tiny_llm))
    spec = SpacetimeExtendPrompt.INPUT_TYPES()["required"]["local_model"][0]
    assert spec == ["tiny-qwen"]
    prompt, _ = SpacetimeExtendPrompt().extend("a cube", "t2v", "local", "tiny-qwen", "", "", 3, 8, "fail")
    assert prompt.strip() and prompt != "a cube"
    with pytest.raises(FileNotFoundError, match=r"local_model='nope': no such model folder in 'LLM' .*Available: \['tiny-qwen'\]"):
        SpacetimeExtendPrompt().extend("a cube", "t2v", "local", "nope", "", "", 3, 8, "fail")
    (tiny_llm / "LLM" / "empty").mkdir()
    with pytest.raises(ValueError, match=r"local_model='empty': .* holds no model \(config.json missing\)"):
        SpacetimeExtendPrompt().extend("a cube", "t2v", "local", "empty", "", "", 3, 8, "fail")
    prompt, note = SpacetimeExtendPrompt().extend("a cube", "t2v", "local", "empty", "", "", 3, 8, "pass through")
    assert prompt == "a cube" and note.startswith("prompt passed through unchanged: local_model='empty'")


@pytest.fixture
def chat_server():
    """A loopback OpenAI-compatible server: answers with ``state['answer']`` and records each request body."""
    state = {"answer": "A red ball rolls to the left.", "finish_reason": "stop", "requests": [], "status": 200}

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args):
            pass

        def do_POST(self):
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            state["requests"].append((self.path, body))
            payload = json.dumps({"choices": [{"message": {"role": "assistant", "content": state["answer"]},
                                               "finish_reason": state["finish_reason"]}]}).encode()
            self.send_response(state["status"])
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}", state
    server.shutdown()
    server.server_close()


def test_endpoint_gets_our_system_prompt_and_its_answer_is_used(chat_server):
    url, state = chat_server
    result = extend_endpoint(url, "qwen2.5:7b-instruct", "red ball left", "i2v", seed=5, max_new_tokens=64, image_caption="a red ball on grey")
    assert result.prompt == "A red ball rolls to the left." and result.note == ""
    path, body = state["requests"][0]
    assert path == "/v1/chat/completions" and body["seed"] == 5 and body["max_tokens"] == 64
    assert body["messages"][0] == {"role": "system", "content": SYSTEM_PROMPTS["i2v"]}
    assert body["messages"][1]["content"] == "Image caption: a red ball on grey\nRequest: red ball left"
    extend_endpoint(url + "/v1/", "m", "x", "t2v", 1, 8)
    assert state["requests"][1][0] == "/v1/chat/completions"


def test_endpoint_answers_that_are_cut_empty_or_unreachable(chat_server):
    url, state = chat_server
    state["answer"], state["finish_reason"] = "A red ball rolls left. The camera follows it slowly and", "length"
    result = extend_endpoint(url, "m", "red ball", "t2v", 1, 16)
    assert result.prompt == "A red ball rolls left." and "reached max_new_tokens=16: truncated" in result.note
    state["answer"], state["finish_reason"] = "  \n ", "stop"
    with pytest.raises(ValueError, match="the LLM's answer is empty"):
        extend_endpoint(url, "m", "red ball", "t2v", 1, 16)
    state["status"] = 500
    with pytest.raises(ValueError, match=r"the server answered HTTP 500"):
        extend_endpoint(url, "m", "red ball", "t2v", 1, 16)
    closed = ThreadingHTTPServer(("127.0.0.1", 0), BaseHTTPRequestHandler)
    dead = f"http://127.0.0.1:{closed.server_address[1]}"
    closed.server_close()  # nothing listens there now
    with pytest.raises(ValueError, match=rf"endpoint_url='{dead}': unreachable \(.*\); allowed: the URL of a running"):
        extend_endpoint(dead, "m", "red ball", "t2v", 1, 16, timeout=5)
    prompt, note = SpacetimeExtendPrompt().extend("red ball", "t2v", "endpoint", "", dead, "m", 1, 16, "pass through")
    assert prompt == "red ball" and "unreachable" in note


def test_bad_inputs_are_refused_before_the_run():
    assert SpacetimeExtendPrompt.VALIDATE_INPUTS(prompt="   ") == "prompt: empty; allowed: a short description of the video to extend"
    assert "mode: value 'x2v' is not allowed" in SpacetimeExtendPrompt.VALIDATE_INPUTS(mode="x2v")
    assert finish('"One. Two"', hit_limit=True, max_new_tokens=4).prompt == "One."
