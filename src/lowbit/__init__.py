"""lowbit: train, search, compress and ship low-bit neural networks."""

from .export import FormatError, load_packed, save_packed
from .nn import QuantizeError, quantize, quantized_layers
from .recipe import Recipe, RecipeError, load_recipe

__version__ = "0.1.0"

__all__ = [
    "FormatError",
    "QuantizeError",
    "Recipe",
    "RecipeError",
    "__version__",
    "load_packed",
    "load_recipe",
    "quantize",
    "quantized_layers",
    "save_packed",
]
