"""Image references → bytes → RGB: fetching under the address guard and decoding safely."""

from .decode import decode_image
from .fetch import Fetched, ImageFetcher, address_policy

__all__ = ["Fetched", "ImageFetcher", "address_policy", "decode_image"]
