"""lowbit: train, search, compress and ship low-bit neural networks."""

from .nn import QuantizeError, quantize, quantized_layers
from .recipe import Recipe, RecipeError, load_recipe

__version__ = "0.1.0"

__all__ = ["QuantizeError", "Recipe", "RecipeError", "__version__", "load_recipe", "quantize",
           "quantized_layers"]
