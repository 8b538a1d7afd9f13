"""The one home of the numbers that define the experiment."""

# Preprocessing, as in the paper and torchvision's IMAGENET1K_V1 weights.
IMAGE_SIZE = 224
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# Age-group upper edges (inclusive): 0-25, 26-50, 51-75, 76-116.
DEFAULT_GROUP_EDGES = (25, 50, 75, 116)
MAX_AGE = 116

# 70/15/15, stratified by age group.
SPLIT_FRACTIONS = {"train": 0.70, "val": 0.15, "test": 0.15}
SPLIT_NAMES = ("train", "val", "test")

# UTKFace's race codes are 0-4 (white, black, asian, indian, others);
# the few names without the field get RACE_UNKNOWN.
RACE_UNKNOWN = -1

# The paper's test accuracy (Table 1), shown beside ours in reports.
PAPER_TEST_ACCURACY = {
    "mobilenet_v2": 0.7058,
    "resnet50": 0.7238,
    "efficientnet_b0": 0.7227,
}

# The paper's head recipe.
PAPER_HEAD = {
    "hidden": (512, 256),
    "dropout": 0.3,
    "lr": 1e-3,
    "epochs": 10,
    "batch_size": 32,
}


def group_names(edges) -> list[str]:
    """'0-25', '26-50', ... from the inclusive upper edges."""
    names, low = [], 0
    for high in edges:
        names.append(f"{low}-{high}")
        low = high + 1
    return names
