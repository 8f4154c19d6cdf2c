"""Machinery shared by the whole-experiment scripts (``scripts/replicate_small.py``): running
stages as the commands a user would type, reusing finished runs only under the recipe they were
trained with, and summarising training seeds (``seeds.py``)."""
