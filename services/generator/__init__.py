"""The generator service: Stable Diffusion + product LoRA adapters over gRPC."""
