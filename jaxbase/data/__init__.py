"""Data sets in host memory, text tokenization, host-side batch iterators and on-device augmentation."""

from jaxbase.data.augment import crop_and_flip
from jaxbase.data.augment import random_crop
from jaxbase.data.augment import random_flip
from jaxbase.data.pipeline import eval_batches
from jaxbase.data.pipeline import eval_batches_from_arrays
from jaxbase.data.pipeline import num_eval_batches
from jaxbase.data.pipeline import steps_per_epoch
from jaxbase.data.pipeline import select_subset
from jaxbase.data.pipeline import train_batches
from jaxbase.data.pipeline import train_batches_from_arrays
from jaxbase.data.pipeline import SequenceTrim
from jaxbase.data.pipeline import sequence_lengths
from jaxbase.data.pipeline import validate_images
from jaxbase.data.pipeline import validate_labels
from jaxbase.data.sources import ImageDataset
from jaxbase.data.sources import load_dataset
from jaxbase.data.sources import load_digits
from jaxbase.data.sources import load_image_folder
from jaxbase.data.sources import load_tfds
from jaxbase.data.sources import validate_dataset
from jaxbase.data.text import SubwordTokenizer
from jaxbase.data.text import TextDataset
from jaxbase.data.text import TokenizedDataset
from jaxbase.data.text import encode_dataset
from jaxbase.data.text import load_text_dataset

__all__ = [
    "ImageDataset",
    "SubwordTokenizer",
    "TextDataset",
    "TokenizedDataset",
    "crop_and_flip",
    "encode_dataset",
    "eval_batches",
    "eval_batches_from_arrays",
    "load_dataset",
    "load_digits",
    "load_image_folder",
    "load_text_dataset",
    "load_tfds",
    "num_eval_batches",
    "random_crop",
    "random_flip",
    "select_subset",
    "steps_per_epoch",
    "train_batches",
    "train_batches_from_arrays",
    "SequenceTrim",
    "sequence_lengths",
    "validate_dataset",
    "validate_images",
    "validate_labels",
]
