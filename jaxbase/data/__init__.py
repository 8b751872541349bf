"""Data sets in host memory, host-side batch iterators and on-device augmentation."""

from jaxbase.data.augment import crop_and_flip
from jaxbase.data.augment import random_crop
from jaxbase.data.augment import random_flip
from jaxbase.data.pipeline import eval_batches
from jaxbase.data.pipeline import num_eval_batches
from jaxbase.data.pipeline import steps_per_epoch
from jaxbase.data.pipeline import train_batches
from jaxbase.data.pipeline import validate_images
from jaxbase.data.pipeline import validate_labels
from jaxbase.data.sources import ImageDataset
from jaxbase.data.sources import load_dataset
from jaxbase.data.sources import load_digits
from jaxbase.data.sources import load_image_folder
from jaxbase.data.sources import load_tfds
from jaxbase.data.sources import validate_dataset

__all__ = [
    "ImageDataset",
    "crop_and_flip",
    "eval_batches",
    "load_dataset",
    "load_digits",
    "load_image_folder",
    "load_tfds",
    "num_eval_batches",
    "random_crop",
    "random_flip",
    "steps_per_epoch",
    "train_batches",
    "validate_dataset",
    "validate_images",
    "validate_labels",
]
