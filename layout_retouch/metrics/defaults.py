"""The metrics' default models and choices, in a module without torch: the command line shows them in
`--help`, which must not wait seconds for torch. The metric modules re-export them."""

DEFAULT_CLIP_MODEL = "openai/clip-vit-base-patch32"
DEFAULT_DINO_MODEL = "facebook/dino-vits16"
# The transformers classifier used when torch-fidelity is missing (an ImageNet-1k classifier).
DEFAULT_IS_CLASSIFIER = "google/vit-base-patch16-224"
# Number of splits of the image set; the score is averaged over them. The paper scores the images
# of each prompt together, so one split (torch-fidelity's default of 10 needs thousands of images).
DEFAULT_IS_SPLITS = 1
IS_BACKENDS = ("auto", "torch-fidelity", "transformers")
DEFAULT_DETECTOR_MODEL = "google/owlv2-base-patch16-ensemble"
DEFAULT_PICKSCORE_MODEL = "yuvalkirstain/PickScore_v1"
# PickScore ships without its own processor; its authors use the processor of the CLIP it was tuned from.
DEFAULT_PICKSCORE_PROCESSOR = "laion/CLIP-ViT-H-14-laion2B-s32B-b79K"
PREFERENCE_METRICS = ("pickscore", "imagereward")
# Metric families of the evaluation; "clip" gives CLIP-I and CLIP-T, "layout" the subject centers.
METRIC_FAMILIES = ("clip", "dino", "preference", "inception", "layout")
