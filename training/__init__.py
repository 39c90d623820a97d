"""Product LoRA training (`python -m training.lora`), offline LoRA conversion (`python -m training.convert`) and the
mean of several training runs (`python -m training.soup`)."""


class TrainingError(Exception):
    """A problem with the inputs or the base model, reported to the user as one clear line."""
