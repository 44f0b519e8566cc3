"""A tiny, fully trained text-to-image world with exact ground truth (see toyworld/README.md).

It plugs into the method only through a diffusers pipeline folder (`models/vanilla`) and the
segmenter interface (`segmenter.ToySegmenter`); nothing in the method special-cases it.
"""
