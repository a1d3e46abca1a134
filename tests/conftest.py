"""Shared test set-up. Offline by construction: the Hugging Face hub is told so at import time, so a missing
pretrained checkpoint fails at once instead of waiting on the network."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
