"""Video prompts: image to video, extend a video forward or backward, connect two videos, and join the
result with the given clips. Each prompt node gives the LATENT to sample and the known frames
(SPACETIME_KNOWN_FRAMES) for the sampler's ``known_frames`` input."""
from __future__ import annotations

from ..jobs.video_prompts import DIRECTIONS, FITS, check_frame_index, connect_videos, extend_video, image_to_video, join_video, with_clip_features
from . import comfy_glue
from .widgets import CLIP_VISION, FRAMES, HEIGHT, KNOWN_FRAMES, STRENGTH, WIDTH, literal_values, size_rule, validate_inputs



def _encoded(vae, make):
    """Run ``make(device, on_chunk) -> KnownFrames`` with the VAE on its device; the prompt node outputs."""
    with comfy_glue.on_device(vae.vae, "vae") as device:
        prompt = make(device, comfy_glue.progress_callback("encoding"))
    return ({"samples": prompt.known.empty_target()}, prompt)


def _frame_index_rule(values: dict) -> None:
    check_frame_index(*literal_values(values, "frame_index", "frames"))


class SpacetimeImageToVideo:
    DESCRIPTION = (
        "Places IMAGE frames in the video to generate, from frame_index on. At frame 0: 1, 5, 9, ... frames, the "
        "first one exactly as given. A single image elsewhere is held still for the 4 frames of the latent frame "
        "holding frame_index (4k-3 to 4k); several frames elsewhere start at frame 1, 5, 9, ... and number 4, 8, "
        "... Images of another size are resized to the video's (resize: crop, pad or stretch). last_image: first and "
        "last frame to video. Image-conditioned models (Wan I2V, FLF2V, 2.2 I2V) take the images through their own "
        "image channels; Wan 2.1 I2V/FLF2V also need clip_vision."
    )
    CATEGORY = "spacetime/conditioning"
    RETURN_TYPES = ("LATENT", KNOWN_FRAMES)
    RETURN_NAMES = ("latent", "known_frames")
    FUNCTION = "place"

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "vae": ("SPACETIME_VAE",),
                "image": ("IMAGE", {"tooltip": "One image, or several frames placed one after another."}),
                "width": WIDTH,
                "height": HEIGHT,
                "frames": FRAMES,
                "frame_index": ("INT", {"default": 0, "min": 0, "max": 4096, "tooltip": "Where the image goes: 0 = first frame, frames - 1 = last."}),
                "strength": STRENGTH,
            },
            "optional": {
                "last_image": ("IMAGE", {"tooltip": "The video's last frame (first and last frame to video)."}),
                "clip_vision": (CLIP_VISION, {"tooltip": "Spacetime Load CLIP Vision (clip_vision_h.safetensors): Wan 2.1 I2V and FLF2V need it; other models ignore it."}),
                "resize": (list(FITS), {"default": FITS[0], "tooltip": "Images of another size than the video: crop (cover, cut the middle), pad (fit, black bars) or stretch."}),
            },
        }

    @classmethod
    def VALIDATE_INPUTS(cls, **values):
        return validate_inputs(cls, values, size_rule, _frame_index_rule)

    def place(self, vae, image, width, height, frames, frame_index, strength, last_image=None, clip_vision=None, resize=FITS[0]):
        latent, prompt = _encoded(vae, lambda device, cb: image_to_video(
            vae, image, width, height, frames, frame_index, strength, device, cb, last_image, resize))
        if clip_vision is not None and prompt.given:
            with comfy_glue.on_device(clip_vision.encoder.model, "text_encoder"):
                prompt = with_clip_features(prompt, clip_vision)
        return latent, prompt


class SpacetimeExtendVideo:
    DESCRIPTION = (
        "Extends a video. forward: the generated video starts with the input's last `overlap` frames (1, 5, 9, ...) "
        "and new_frames (4, 8, ...) follow. backward: it ends with the input's first `overlap` frames (4, 8, ...) "
        "and new_frames (1, 5, 9, ...) come before. Sample, decode, then Spacetime Join Video gives the whole clip."
    )
    CATEGORY = "spacetime/conditioning"
    RETURN_TYPES = ("LATENT", KNOWN_FRAMES)
    RETURN_NAMES = ("latent", "known_frames")
    FUNCTION = "extend"

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "vae": ("SPACETIME_VAE",),
                "video": ("IMAGE", {"tooltip": "The input video's frames."}),
                "direction": (list(DIRECTIONS), {"default": DIRECTIONS[0]}),
                "overlap": ("INT", {"default": 5, "min": 1, "max": 4096, "tooltip": "Input frames the new video shares: forward 1, 5, 9, ...; backward 4, 8, 12, ..."}),
                "new_frames": ("INT", {"default": 12, "min": 1, "max": 4096, "tooltip": "Frames to generate: forward 4, 8, ...; backward 1, 5, 9, ..."}),
                "strength": STRENGTH,
            }
        }

    @classmethod
    def VALIDATE_INPUTS(cls, **values):
        return validate_inputs(cls, values)

    def extend(self, vae, video, direction, overlap, new_frames, strength):
        return _encoded(vae, lambda device, cb: extend_video(vae, video, direction, overlap, new_frames, strength, device, cb))


class SpacetimeConnectVideos:
    DESCRIPTION = (
        "Connects two videos with a generated bridge: the generated video starts with clip_a's last overlap + 1 "
        "frames and ends with clip_b's first `overlap` frames (overlap 4, 8, ...; bridge_frames 4, 8, ...). Both "
        "clips must have the same width and height (refused otherwise: resize one first). Sample, decode, then "
        "Spacetime Join Video gives A + bridge + B."
    )
    CATEGORY = "spacetime/conditioning"
    RETURN_TYPES = ("LATENT", KNOWN_FRAMES)
    RETURN_NAMES = ("latent", "known_frames")
    FUNCTION = "connect"

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "vae": ("SPACETIME_VAE",),
                "clip_a": ("IMAGE", {"tooltip": "The video that comes first."}),
                "clip_b": ("IMAGE", {"tooltip": "The video that comes last."}),
                "overlap": ("INT", {"default": 4, "min": 4, "max": 4096, "step": 4, "tooltip": "Frames shared with each clip: 4, 8, 12, ..."}),
                "bridge_frames": ("INT", {"default": 8, "min": 4, "max": 4096, "step": 4, "tooltip": "New frames between the clips: 4, 8, 12, ..."}),
                "strength": STRENGTH,
            }
        }

    @classmethod
    def VALIDATE_INPUTS(cls, **values):
        return validate_inputs(cls, values)

    def connect(self, vae, clip_a, clip_b, overlap, bridge_frames, strength):
        return _encoded(vae, lambda device, cb: connect_videos(vae, clip_a, clip_b, overlap, bridge_frames, strength, device, cb))


class SpacetimeJoinVideo:
    DESCRIPTION = (
        "The whole clip of an extension or connection: the given clips' own frames with the decoded new frames "
        "between or after them (the generated copies of the overlapping frames are dropped)."
    )
    CATEGORY = "spacetime/video"
    RETURN_TYPES = ("IMAGE",)
    FUNCTION = "join"

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "images": ("IMAGE", {"tooltip": "The decoded output of the sampler that used known_frames."}),
                "known_frames": (KNOWN_FRAMES,),
            }
        }

    def join(self, images, known_frames):
        return (join_video(images, known_frames),)
