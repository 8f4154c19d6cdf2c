"""Class sets and id mappings against the official definitions."""

import numpy as np

from dino_skipless.data.classes import (
    ADE20K_CLASSES,
    COCO_CATEGORIES,
    COCOSTUFF_CLASSES,
    COCOSTUFF_COARSE_CLASSES,
    COCOSTUFF_RAW_NAMES,
    COCOSTUFF_UNUSED_RAW,
    VOC_CLASSES,
    ade20k_lut,
    cocostuff_fine_to_coarse,
    cocostuff_lut,
    voc_lut,
    voc_palette,
)


def test_cocostuff_raw_to_171():
    lut = cocostuff_lut()
    # Thing ids before the first unused one (street sign, raw 11) keep their value.
    assert lut[0] == 0 and COCOSTUFF_CLASSES[0] == "person"
    assert lut[10] == 10 and COCOSTUFF_CLASSES[10] == "fire hydrant"
    assert lut[11] == 255  # street sign: never annotated
    assert lut[12] == 11 and COCOSTUFF_CLASSES[11] == "stop sign"
    assert lut[89] == 79 and COCOSTUFF_CLASSES[79] == "toothbrush"
    assert lut[90] == 255  # hair brush
    assert lut[91] == 80 and COCOSTUFF_CLASSES[80] == "banner"  # first stuff class
    assert lut[181] == 170 and COCOSTUFF_CLASSES[170] == "wood"
    assert lut[255] == 255 and (lut[182:] == 255).all()
    unused = {COCOSTUFF_RAW_NAMES[i] for i in COCOSTUFF_UNUSED_RAW}
    assert unused == {
        "street sign",
        "hat",
        "shoe",
        "eye glasses",
        "plate",
        "mirror",
        "window",
        "desk",
        "door",
        "blender",
        "hair brush",
    }
    used = np.flatnonzero(lut != 255)
    assert len(used) == 171 and (lut[used] == np.arange(171)).all()  # increasing order


def test_cocostuff_coarse():
    f2c = cocostuff_fine_to_coarse()
    name = {c: COCOSTUFF_COARSE_CLASSES[f2c[i]] for i, c in enumerate(COCOSTUFF_CLASSES)}
    assert name["person"] == "person" and name["toothbrush"] == "indoor"
    assert name["car"] == "vehicle" and name["giraffe"] == "animal"
    assert name["sky-other"] == "sky" and name["clouds"] == "sky"
    assert name["grass"] == "plant" and name["sea"] == "water" and name["road"] == "ground"
    assert name["wall-brick"] == "wall" and name["wood"] == "solid"
    assert set(f2c.tolist()) == set(range(27))
    # STEGO's numbering: things 0..11, stuff 12..26; e.g. person 9, sky 23.
    coarse = cocostuff_lut(coarse=True)
    assert coarse[0] == 9 and coarse[156] == 23 and coarse[181] == 24 and coarse[255] == 255
    assert (f2c[:80] < 12).all() and (f2c[80:] >= 12).all()


def test_ade_voc_luts_and_palette():
    ade = ade20k_lut()
    assert len(ADE20K_CLASSES) == 150
    assert ade[0] == 255 and ade[1] == 0 and ade[150] == 149 and ade[151] == 255
    voc = voc_lut()
    assert len(VOC_CLASSES) == 21 and voc[20] == 20 and voc[21] == 255 and voc[255] == 255
    pal = voc_palette()
    assert pal[1].tolist() == [128, 0, 0] and pal[15].tolist() == [192, 128, 128]
    assert pal[255].tolist() == [224, 224, 192]


def test_coco_categories():
    ids = [c[0] for c in COCO_CATEGORIES]
    assert len(ids) == 80 and ids == sorted(ids)
    assert COCO_CATEGORIES[0] == (1, "person", "person")
    assert COCO_CATEGORIES[-1] == (90, "toothbrush", "indoor")
    assert 12 not in ids and 91 not in ids
