"""The Upscaler service: Swin2SR x4 on the local device (tiled), or Replicate's mv-lab/swin2sr."""
