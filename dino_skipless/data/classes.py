"""Class sets of the real datasets, and the id mappings their label files need.

Everything here is data plus pure functions that build lookup tables, so readers, the synthetic
writer and the tests share one definition of each id space.
"""

from __future__ import annotations

import numpy as np

IGNORE_INDEX = 255

# Index 0 is background; 255 in the PNGs is the "void" boundary/difficult band.
VOC_CLASSES = (
    "background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair",
    "cow", "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa",
    "train", "tvmonitor",
)  # fmt: skip
VOC_OBJECT_CLASSES = VOC_CLASSES[1:]

# ADEChallengeData2016 objectInfo150 order; the PNGs store 1..150 and 0 = "other" (ignored).
ADE20K_CLASSES = (
    "wall", "building", "sky", "floor", "tree", "ceiling", "road", "bed", "windowpane", "grass",
    "cabinet", "sidewalk", "person", "earth", "door", "table", "mountain", "plant", "curtain",
    "chair", "car", "water", "painting", "sofa", "shelf", "house", "sea", "mirror", "rug", "field",
    "armchair", "seat", "fence", "desk", "rock", "wardrobe", "lamp", "bathtub", "railing",
    "cushion", "base", "box", "column", "signboard", "chest of drawers", "counter", "sand", "sink",
    "skyscraper", "fireplace", "refrigerator", "grandstand", "path", "stairs", "runway", "case",
    "pool table", "pillow", "screen door", "stairway", "river", "bridge", "bookcase", "blind",
    "coffee table", "toilet", "flower", "book", "hill", "bench", "countertop", "stove", "palm",
    "kitchen island", "computer", "swivel chair", "boat", "bar", "arcade machine", "hovel", "bus",
    "towel", "light", "truck", "tower", "chandelier", "awning", "streetlight", "booth",
    "television receiver", "airplane", "dirt track", "apparel", "pole", "land", "bannister",
    "escalator", "ottoman", "bottle", "buffet", "poster", "stage", "van", "ship", "fountain",
    "conveyer belt", "canopy", "washer", "plaything", "swimming pool", "stool", "barrel", "basket",
    "waterfall", "tent", "bag", "minibike", "cradle", "oven", "ball", "food", "step", "tank",
    "trade name", "microwave", "pot", "animal", "bicycle", "lake", "dishwasher", "screen",
    "blanket", "sculpture", "hood", "sconce", "vase", "traffic light", "tray", "ashcan", "fan",
    "pier", "crt screen", "plate", "monitor", "bulletin board", "shower", "radiator", "glass",
    "clock", "flag",
)  # fmt: skip

# COCO-Stuff-164k stuffthingmaps store 0-indexed ids: raw id = labels.txt id - 1, so 0..90 are
# the 91 COCO thing ids (11 of them never annotated) and 91..181 the 91 stuff classes.
COCOSTUFF_RAW_NAMES = (
    "person", "bicycle", "car", "motorcycle", "airplane", "bus", "train", "truck", "boat",
    "traffic light", "fire hydrant", "street sign", "stop sign", "parking meter", "bench", "bird",
    "cat", "dog", "horse", "sheep", "cow", "elephant", "bear", "zebra", "giraffe", "hat",
    "backpack", "umbrella", "shoe", "eye glasses", "handbag", "tie", "suitcase", "frisbee", "skis",
    "snowboard", "sports ball", "kite", "baseball bat", "baseball glove", "skateboard",
    "surfboard", "tennis racket", "bottle", "plate", "wine glass", "cup", "fork", "knife", "spoon",
    "bowl", "banana", "apple", "sandwich", "orange", "broccoli", "carrot", "hot dog", "pizza",
    "donut", "cake", "chair", "couch", "potted plant", "bed", "mirror", "dining table", "window",
    "desk", "toilet", "door", "tv", "laptop", "mouse", "remote", "keyboard", "cell phone",
    "microwave", "oven", "toaster", "sink", "refrigerator", "blender", "book", "clock", "vase",
    "scissors", "teddy bear", "hair drier", "toothbrush", "hair brush",
    "banner", "blanket", "branch", "bridge", "building-other", "bush", "cabinet", "cage",
    "cardboard", "carpet", "ceiling-other", "ceiling-tile", "cloth", "clothes", "clouds",
    "counter", "cupboard", "curtain", "desk-stuff", "dirt", "door-stuff", "fence", "floor-marble",
    "floor-other", "floor-stone", "floor-tile", "floor-wood", "flower", "fog", "food-other",
    "fruit", "furniture-other", "grass", "gravel", "ground-other", "hill", "house", "leaves",
    "light", "mat", "metal", "mirror-stuff", "moss", "mountain", "mud", "napkin", "net", "paper",
    "pavement", "pillow", "plant-other", "plastic", "platform", "playingfield", "railing",
    "railroad", "river", "road", "rock", "roof", "rug", "salad", "sand", "sea", "shelf",
    "sky-other", "skyscraper", "snow", "solid-other", "stairs", "stone", "straw",
    "structural-other", "table", "tent", "textile-other", "towel", "tree", "vegetable",
    "wall-brick", "wall-concrete", "wall-other", "wall-panel", "wall-stone", "wall-tile",
    "wall-wood", "water-other", "waterdrops", "window-blind", "window-other", "wood",
)  # fmt: skip
# Thing ids that COCO defined but never annotated (street sign, hat, shoe, eye glasses, plate,
# mirror, window, desk, door, blender, hair brush): they never occur in the label maps.
COCOSTUFF_UNUSED_RAW = (11, 25, 28, 29, 44, 65, 67, 68, 70, 82, 90)
COCOSTUFF_USED_RAW = tuple(i for i in range(182) if i not in COCOSTUFF_UNUSED_RAW)
COCOSTUFF_CLASSES = tuple(COCOSTUFF_RAW_NAMES[i] for i in COCOSTUFF_USED_RAW)
COCOSTUFF_FIRST_STUFF_RAW = 91

# The 27-class variant (IIC/PiCIE/STEGO "cocostuff27"): every class goes to its COCO
# supercategory; 12 thing supercategories first, then 15 stuff ones, in STEGO's order.
COCOSTUFF_COARSE_CLASSES = (
    "electronic", "appliance", "food", "furniture", "indoor", "kitchen", "accessory", "animal",
    "outdoor", "person", "sports", "vehicle", "ceiling", "floor", "food-stuff", "furniture-stuff",
    "raw-material", "textile", "wall", "window", "building", "ground", "plant", "sky", "solid",
    "structural", "water",
)  # fmt: skip
# Thing supercategories follow COCO's id order, so contiguous raw-id ranges suffice.
_THING_SUPER_RANGES = (
    ("person", 0, 0), ("vehicle", 1, 8), ("outdoor", 9, 14), ("animal", 15, 24),
    ("accessory", 25, 32), ("sports", 33, 42), ("kitchen", 43, 50), ("food", 51, 60),
    ("furniture", 61, 70), ("electronic", 71, 76), ("appliance", 77, 82), ("indoor", 83, 90),
)  # fmt: skip
_STUFF_SUPER = {
    "ceiling": ("ceiling-other", "ceiling-tile"),
    "floor": ("carpet", "floor-marble", "floor-other", "floor-stone", "floor-tile", "floor-wood"),
    "food-stuff": ("food-other", "fruit", "salad", "vegetable"),
    "furniture-stuff": (
        "cabinet", "counter", "cupboard", "desk-stuff", "door-stuff", "furniture-other", "light",
        "mirror-stuff", "shelf", "stairs", "table",
    ),
    "raw-material": ("cardboard", "metal", "paper", "plastic"),
    "textile": (
        "banner", "blanket", "cloth", "clothes", "curtain", "mat", "napkin", "pillow", "rug",
        "textile-other", "towel",
    ),
    "wall": (
        "wall-brick", "wall-concrete", "wall-other", "wall-panel", "wall-stone", "wall-tile",
        "wall-wood",
    ),
    "window": ("window-blind", "window-other"),
    "building": ("bridge", "building-other", "house", "roof", "skyscraper", "tent"),
    "ground": (
        "dirt", "gravel", "ground-other", "mud", "pavement", "platform", "playingfield",
        "railroad", "road", "sand", "snow",
    ),
    "plant": (
        "branch", "bush", "flower", "grass", "leaves", "moss", "plant-other", "straw", "tree",
    ),
    "sky": ("clouds", "sky-other"),
    "solid": ("hill", "mountain", "rock", "solid-other", "stone", "wood"),
    "structural": ("cage", "fence", "net", "railing", "structural-other"),
    "water": ("fog", "river", "sea", "water-other", "waterdrops"),
}  # fmt: skip


def cocostuff_supercategory(raw_id: int) -> str:
    """Supercategory name (an entry of COCOSTUFF_COARSE_CLASSES) of a 0-indexed raw id."""
    if raw_id < COCOSTUFF_FIRST_STUFF_RAW:
        for name, lo, hi in _THING_SUPER_RANGES:
            if lo <= raw_id <= hi:
                return name
    else:
        fine = COCOSTUFF_RAW_NAMES[raw_id]
        for name, members in _STUFF_SUPER.items():
            if fine in members:
                return name
    raise KeyError(f"no COCO-Stuff raw id {raw_id}")


def cocostuff_fine_to_coarse() -> np.ndarray:
    """(171,) array: fine class index 0..170 -> coarse class index 0..26."""
    coarse_index = {n: i for i, n in enumerate(COCOSTUFF_COARSE_CLASSES)}
    return np.array(
        [coarse_index[cocostuff_supercategory(r)] for r in COCOSTUFF_USED_RAW], dtype=np.uint8
    )


def lut_from_pairs(pairs: dict[int, int]) -> np.ndarray:
    """256-entry uint8 lookup table; every value not listed maps to IGNORE_INDEX."""
    lut = np.full(256, IGNORE_INDEX, dtype=np.uint8)
    for raw, cls in pairs.items():
        lut[raw] = cls
    return lut


def voc_lut() -> np.ndarray:
    return lut_from_pairs({i: i for i in range(len(VOC_CLASSES))})


def ade20k_lut() -> np.ndarray:
    return lut_from_pairs({i + 1: i for i in range(len(ADE20K_CLASSES))})


def cocostuff_lut(coarse: bool = False, already_fine: bool = False) -> np.ndarray:
    """Raw stuffthingmaps id (or, with already_fine, an mmseg labelTrainIds id) -> class index."""
    fine = (
        {i: i for i in range(len(COCOSTUFF_CLASSES))}
        if already_fine
        else {raw: i for i, raw in enumerate(COCOSTUFF_USED_RAW)}
    )
    if coarse:
        f2c = cocostuff_fine_to_coarse()
        fine = {raw: int(f2c[i]) for raw, i in fine.items()}
    return lut_from_pairs(fine)


def voc_palette() -> np.ndarray:
    """(256, 3) uint8: the colour map of the VOC devkit's labelcolormap (bit-interleaved)."""
    pal = np.zeros((256, 3), dtype=np.uint8)
    for i in range(256):
        c, r, g, b = i, 0, 0, 0
        for j in range(8):
            r |= ((c >> 0) & 1) << (7 - j)
            g |= ((c >> 1) & 1) << (7 - j)
            b |= ((c >> 2) & 1) << (7 - j)
            c >>= 3
        pal[i] = (r, g, b)
    return pal


def _coco_categories() -> tuple[tuple[int, str, str], ...]:
    """The 80 COCO detection categories as (category_id, name, supercategory)."""
    return tuple(
        (raw + 1, COCOSTUFF_RAW_NAMES[raw], cocostuff_supercategory(raw))
        for raw in COCOSTUFF_USED_RAW
        if raw < COCOSTUFF_FIRST_STUFF_RAW
    )


COCO_CATEGORIES = _coco_categories()

assert len(VOC_CLASSES) == 21
assert len(ADE20K_CLASSES) == 150
assert len(COCOSTUFF_RAW_NAMES) == 182
assert len(COCOSTUFF_CLASSES) == 171
assert len(COCOSTUFF_COARSE_CLASSES) == 27
assert len(COCO_CATEGORIES) == 80
assert sum(len(v) for v in _STUFF_SUPER.values()) == 182 - COCOSTUFF_FIRST_STUFF_RAW
