"""medcap: radiology image captioning with BLIP-2 and parameter-efficient fine-tuning."""

__version__ = "0.1.0"
