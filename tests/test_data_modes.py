"""Images outside 8-bit RGB/L/P: converted by their real range or refused naming the mode
(16-bit PNGs used to clip to white, float TIFFs to black), flagged by data.check; and
decompression bombs, which are bad images with a limit that can be raised."""

from __future__ import annotations

import json
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from dino_skipless.data import DatasetError, ImageFolderDataset
from dino_skipless.data.check import main as check_main
from dino_skipless.data.files import MAX_PIXELS_ENV, load_rgb
from dino_skipless.dino import decode

RAMP16 = (np.arange(16 * 16, dtype=np.uint32).reshape(16, 16) * 257).astype(np.uint16)


def test_16bit_png_is_scaled_by_its_range(tmp_path):
    Image.fromarray(RAMP16).save(tmp_path / "g16.png")
    assert Image.open(tmp_path / "g16.png").mode.startswith("I")
    rgb = np.asarray(load_rgb(tmp_path / "g16.png"))
    # v / 257 exactly: the ramp 0..255*257 reads as 0..255 in every channel, not clipped white
    assert (rgb == np.arange(256).reshape(16, 16)[..., None]).all()


def test_16bit_tiff_is_scaled_by_its_range(tmp_path):
    Image.fromarray(RAMP16).save(tmp_path / "g16.tif")
    rgb = np.asarray(load_rgb(tmp_path / "g16.tif"))
    assert rgb[..., 0].tolist() == np.arange(256).reshape(16, 16).tolist()


def test_float_tiff_in_unit_range_is_read_as_0_to_255(tmp_path):
    f = np.linspace(0, 1, 256, dtype=np.float32).reshape(16, 16)
    Image.fromarray(f).save(tmp_path / "f.tif")
    rgb = np.asarray(load_rgb(tmp_path / "f.tif"))
    assert (rgb[..., 1] == np.round(f * 255)).all() and rgb.max() == 255  # not all black


@pytest.mark.parametrize(
    "array, mode_words",
    [
        (np.full((8, 8), 3.5, np.float32), "'F'"),  # float outside [0, 1]
        (np.full((8, 8), np.nan, np.float32), "'F'"),
        (np.arange(64, dtype=np.int32).reshape(8, 8) * 100000, "'I'"),  # 32-bit integers
    ],
)
def test_images_of_unknown_range_are_refused_naming_the_mode(tmp_path, array, mode_words):
    Image.fromarray(array).save(tmp_path / "x.tif")
    with pytest.raises(DatasetError, match=mode_words) as e:
        load_rgb(tmp_path / "x.tif")
    assert str(tmp_path / "x.tif") in str(e.value) and "corrupt" not in str(e.value)


def test_check_flags_converted_and_refused_modes(tmp_path):
    root = tmp_path / "imgs"
    (root / "a").mkdir(parents=True)
    Image.new("RGB", (8, 8), (1, 2, 3)).save(root / "a" / "ok.png")
    Image.fromarray(RAMP16).save(root / "a" / "deep.png")
    Image.fromarray(np.full((8, 8), 7.0, np.float32)).save(root / "a" / "hdr.tif")
    out = tmp_path / "r.json"
    assert check_main(["--dataset", "imagefolder", "--root", str(root), "--json", str(out)]) == 1
    rep = json.loads(out.read_text())
    assert len(rep["problems"]) == 1 and "hdr.tif" in rep["problems"][0]
    assert any("deep.png" in w and "16-bit" in w for w in rep["warnings"]), rep["warnings"]


def _png_header(width: int, height: int) -> bytes:
    """A PNG that declares width x height pixels and holds none: a decompression bomb's header
    (opening reads only the header, so nothing large is ever allocated)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        crc = zlib.crc32(kind + data) & 0xFFFFFFFF
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", crc)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b""))


def test_decompression_bomb_is_a_bad_image_naming_the_limit(tmp_path):
    (tmp_path / "bomb.png").write_bytes(_png_header(20000, 20000))  # 4e8 px: PIL's own error
    (tmp_path / "big.png").write_bytes(_png_header(12000, 10000))  # 1.2e8 px: PIL only warns
    for name in ("bomb.png", "big.png"):
        with pytest.raises(DatasetError, match="decompression-bomb limit") as e:
            load_rgb(tmp_path / name)
        msg = str(e.value)
        assert name in msg and "89,478,485" in msg and "--max-image-pixels" in msg
        assert "data.max_image_pixels" in msg and "\n" not in msg


def test_the_limit_can_be_raised_and_lowered(tmp_path, monkeypatch):
    Image.new("RGB", (16, 10), (5, 6, 7)).save(tmp_path / "small.png")
    monkeypatch.setenv(MAX_PIXELS_ENV, "100")
    with pytest.raises(DatasetError, match="16x10 = 160 pixels"):
        load_rgb(tmp_path / "small.png")
    monkeypatch.setenv(MAX_PIXELS_ENV, "160")
    assert load_rgb(tmp_path / "small.png").size == (16, 10)


def test_a_lowered_limit_leaves_pil_global_alone(tmp_path, monkeypatch):
    """A lower limit is the reader's own check: PIL's process-wide Image.MAX_IMAGE_PIXELS,
    lowered, made every later plain Image.open of a 64 x 64 mask raise a decompression bomb."""
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", Image.MAX_IMAGE_PIXELS)  # restored after
    before = Image.MAX_IMAGE_PIXELS
    Image.new("RGB", (20, 12)).save(tmp_path / "small.png")  # 240 px: above twice 100
    monkeypatch.setenv(MAX_PIXELS_ENV, "100")
    with pytest.raises(DatasetError, match="decompression-bomb limit of 100"):
        load_rgb(tmp_path / "small.png")
    assert Image.MAX_IMAGE_PIXELS == before
    Image.open(tmp_path / "small.png").close()  # no DecompressionBombError


def test_bomb_is_replaced_under_on_error_skip(tmp_path):
    """The pretraining guard (data.on_error=skip) replaces a bomb like any unreadable image."""
    for c in ("a", "b"):
        (tmp_path / c).mkdir()
        Image.new("RGB", (8, 8), (1, 2, 3)).save(tmp_path / c / "ok.png")
    (tmp_path / "a" / "z_bomb.png").write_bytes(_png_header(20000, 20000))
    base = ImageFolderDataset(tmp_path)
    bomb = base.ids.index("a/z_bomb.png")
    img, status, problem = decode.load_image(base, 0, 0, bomb, "skip")
    assert status == decode.REPLACED and img.size == (8, 8) and "z_bomb.png" in problem
    _, status, problem = decode.load_image(base, 0, 0, bomb, "raise")
    assert status == decode.UNUSABLE and "decompression-bomb" in problem


def test_flags_and_config_set_the_limit(tmp_path, monkeypatch):
    """data.check --max-image-pixels, every evaluation CLI's --max-image-pixels and pretraining's
    data.max_image_pixels reach the reader (and its loader workers, through the environment)."""
    from conftest import TINY_PRETRAIN, write_image_folder

    from dino_skipless.cli import add_backbone_args
    from dino_skipless.pretrain import main as pretrain_main

    monkeypatch.setenv(MAX_PIXELS_ENV, str(89_478_485))  # restored after the test
    root = write_image_folder(tmp_path / "imgs", n=8)  # 40 x 40 px images
    out = tmp_path / "r.json"
    args = ["--dataset", "imagefolder", "--root", str(root), "--json", str(out)]
    assert check_main([*args, "--max-image-pixels", "1600"]) == 0
    assert check_main([*args, "--max-image-pixels", "1599"]) == 1
    assert "decompression-bomb" in json.loads(out.read_text())["problems"][0]

    import argparse

    p = argparse.ArgumentParser()
    add_backbone_args(p)
    assert p.parse_args(["--max-image-pixels", "1234"]).max_image_pixels == 1234
    from dino_skipless.data.files import max_image_pixels

    assert max_image_pixels() == 1234

    argv = [f"data.path={root}", f"--out={tmp_path / 'run'}", "data.max_image_pixels=100"]
    argv += [f"{k}={v}" for k, v in TINY_PRETRAIN.items()]
    with pytest.raises(SystemExit) as e:
        pretrain_main(argv)
    msg = str(e.value)
    assert "decompression-bomb limit of 100" in msg and "data.on_error=skip" in msg
    assert "\n" not in msg and "Traceback" not in msg


def test_knn_monitor_reads_images_through_the_pipeline_reader(tmp_path):
    """The pretraining k-NN monitor decodes its held-out images like every other stage: a
    16-bit PNG by its range (PIL's convert clipped it to white), a bomb named as a bad image."""
    from dino_skipless.dino.monitor import _Decoded

    Image.fromarray(RAMP16).save(tmp_path / "g16.png")  # 16 x 16: kept at its size
    x, label = _Decoded([(tmp_path / "g16.png", 3)], 16)[0]
    assert label == 3 and x.shape == (3, 16, 16)
    assert (x[0].numpy() == np.arange(256).reshape(16, 16)).all()
    (tmp_path / "bomb.png").write_bytes(_png_header(20000, 20000))
    with pytest.raises(DatasetError, match="decompression-bomb limit"):
        _Decoded([(tmp_path / "bomb.png", 0)], 16)[0]
