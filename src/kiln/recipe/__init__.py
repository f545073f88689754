"""Recipes: YAML files that run a whole pipeline (merge, quantize, export, verify, eval, bench, report).

`load_recipe` validates a file (errors name its line and key); `Runner` plans and runs it with
content-addressed caching and resumption. `kiln recipe` (kiln.recipe.cli) is a thin layer over both.
"""

from kiln.recipe.load import LoadedRecipe, RecipeError, load_recipe
from kiln.recipe.run import Runner, StepStatus

__all__ = ["LoadedRecipe", "RecipeError", "Runner", "StepStatus", "load_recipe"]
