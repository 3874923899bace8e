"""Preference data: the loaders of every dataset kind, the built-in synthetic world, and the text a builtin base model
is pretrained on."""
