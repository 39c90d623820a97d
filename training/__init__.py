"""Product LoRA training (`python -m training.lora`) and offline LoRA conversion (`python -m training.convert`)."""


class TrainingError(Exception):
    """A problem with the inputs or the base model, reported to the user as one clear line."""
