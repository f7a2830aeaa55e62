"""ComfyUI nodes of the pack (V1 classes). Node ids are prefixed ``Spacetime`` to avoid clashes."""
from .hub import SpacetimeHubDownload
from .long_video import SpacetimeLongVideo, SpacetimePromptSchedule
from .lora import SpacetimeLoadLoRA
from .loaders import SpacetimeCLIPVisionLoader, SpacetimeModelLoader, SpacetimeTextEncoderLoader, SpacetimeVAELoader
from .packed import SpacetimePackedSampler
from .parallel import SpacetimeMultiGPU
from .prompt import SpacetimeExtendPrompt
from .provenance import SpacetimeSaveVideo, SpacetimeVerify
from .sampling import SpacetimeEmptyLatentVideo, SpacetimeExpertPair, SpacetimeSampler, SpacetimeTextEncode
from .step_cache import SpacetimeStepCache
from .vae import SpacetimeVAEDecode, SpacetimeVAEEncode
from .video_prompts import SpacetimeConnectVideos, SpacetimeExtendVideo, SpacetimeImageToVideo, SpacetimeJoinVideo

NODE_CLASS_MAPPINGS = {
    "SpacetimeModelLoader": SpacetimeModelLoader,
    "SpacetimeVAELoader": SpacetimeVAELoader,
    "SpacetimeTextEncoderLoader": SpacetimeTextEncoderLoader,
    "SpacetimeCLIPVisionLoader": SpacetimeCLIPVisionLoader,
    "SpacetimeLoadLoRA": SpacetimeLoadLoRA,
    "SpacetimeTextEncode": SpacetimeTextEncode,
    "SpacetimeEmptyLatentVideo": SpacetimeEmptyLatentVideo,
    "SpacetimeSampler": SpacetimeSampler,
    "SpacetimePackedSampler": SpacetimePackedSampler,
    "SpacetimeVAEDecode": SpacetimeVAEDecode,
    "SpacetimeVAEEncode": SpacetimeVAEEncode,
    "SpacetimeHubDownload": SpacetimeHubDownload,
    "SpacetimeImageToVideo": SpacetimeImageToVideo,
    "SpacetimeExtendVideo": SpacetimeExtendVideo,
    "SpacetimeConnectVideos": SpacetimeConnectVideos,
    "SpacetimeJoinVideo": SpacetimeJoinVideo,
    "SpacetimeLongVideo": SpacetimeLongVideo,
    "SpacetimePromptSchedule": SpacetimePromptSchedule,
    "SpacetimeExpertPair": SpacetimeExpertPair,
    "SpacetimeSaveVideo": SpacetimeSaveVideo,
    "SpacetimeVerify": SpacetimeVerify,
    "SpacetimeExtendPrompt": SpacetimeExtendPrompt,
    "SpacetimeStepCache": SpacetimeStepCache,
    "SpacetimeMultiGPU": SpacetimeMultiGPU,
}

NODE_DISPLAY_NAME_MAPPINGS = {
    "SpacetimeModelLoader": "Spacetime Load Diffusion Model",
    "SpacetimeVAELoader": "Spacetime Load VAE",
    "SpacetimeTextEncoderLoader": "Spacetime Load Text Encoder",
    "SpacetimeCLIPVisionLoader": "Spacetime Load CLIP Vision",
    "SpacetimeLoadLoRA": "Spacetime Load LoRA",
    "SpacetimeTextEncode": "Spacetime Text Encode",
    "SpacetimeEmptyLatentVideo": "Spacetime Empty Video Latent",
    "SpacetimeSampler": "Spacetime Sampler",
    "SpacetimePackedSampler": "Spacetime Packed Sampler",
    "SpacetimeVAEDecode": "Spacetime VAE Decode",
    "SpacetimeVAEEncode": "Spacetime VAE Encode",
    "SpacetimeHubDownload": "Spacetime Download From Hub",
    "SpacetimeImageToVideo": "Spacetime Image To Video",
    "SpacetimeExtendVideo": "Spacetime Extend Video",
    "SpacetimeConnectVideos": "Spacetime Connect Videos",
    "SpacetimeJoinVideo": "Spacetime Join Video",
    "SpacetimeLongVideo": "Spacetime Long Video",
    "SpacetimePromptSchedule": "Spacetime Prompt Schedule",
    "SpacetimeExpertPair": "Spacetime Pair Experts (Wan 2.2 A14B)",
    "SpacetimeSaveVideo": "Spacetime Save Video",
    "SpacetimeVerify": "Spacetime Verify",
    "SpacetimeExtendPrompt": "Spacetime Extend Prompt",
    "SpacetimeStepCache": "Spacetime Step Cache",
    "SpacetimeMultiGPU": "Spacetime Multi-GPU",
}
