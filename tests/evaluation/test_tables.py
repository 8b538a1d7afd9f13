"""evaluation/tables.py: the paper column appears only where the study's number means something."""

from pipeline.constants import PAPER_TEST_ACCURACY
from pipeline.evaluation.tables import paper_accuracy

ONE_BACKBONE = {"backbones": ["resnet50"], "group_edges": [25, 50, 75, 116]}


def test_the_paper_number_stands_beside_a_single_backbone_head_on_utkface_only():
    assert paper_accuracy(ONE_BACKBONE) == PAPER_TEST_ACCURACY["resnet50"]
    assert paper_accuracy(ONE_BACKBONE, "labels file ages.csv") is None          # another data set
    assert paper_accuracy(ONE_BACKBONE, "class folders") is None
    assert paper_accuracy({**ONE_BACKBONE, "group_edges": [18, 30, 45, 60, 116]}) is None   # other groups
    assert paper_accuracy({**ONE_BACKBONE, "backbones": ["resnet50", "mobilenet_v2"]}) is None  # a fusion
