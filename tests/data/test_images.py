"""Reading user images: JPEG, PNG, TIFF (16-bit too) and DICOM (real files bundled with pydicom and
pydicom-data, plus synthetic ones with known values), and a clear error for every bad file."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pydicom
import pytest
from PIL import Image
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.pixels import get_decoder, pixel_array
from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid

from medcap.data.images import ImageReadError, is_dicom_file, read_image
from tests.fixtures import skip_missing


def _testdata(name: str) -> str:
    """A DICOM file from pydicom or pydicom-data, never downloaded (no network here)."""
    path = get_testdata_file(name, download=False)
    if path is None:
        skip_missing(f"{name} is not installed (it comes with pydicom-data)")
    return str(path)


def _arr(im: Image.Image) -> np.ndarray:
    assert im.mode == "RGB"
    return np.asarray(im).astype(np.int64)


def _grey(im: Image.Image) -> np.ndarray:
    a = _arr(im)
    assert (a[..., 0] == a[..., 1]).all() and (a[..., 1] == a[..., 2]).all()
    return a[..., 0]


def _dicom_bytes(
    pixels: np.ndarray,
    *,
    photometric: str = "MONOCHROME2",
    preamble: bool = True,
    **elements,
) -> bytes:
    """A minimal uncompressed DICOM (16-bit unsigned grey unless told otherwise) with ``pixels``."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = SecondaryCaptureImageStorage
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.Modality = "OT"
    frames = pixels.shape[0] if pixels.ndim == 3 else 1
    ds.Rows, ds.Columns = pixels.shape[-2], pixels.shape[-1]
    if frames > 1:
        ds.NumberOfFrames = frames
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = photometric
    ds.BitsAllocated = ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 0
    for key, value in elements.items():
        setattr(ds, key, value)
    ds.PixelData = pixels.astype("<u2").tobytes()
    buf = io.BytesIO()
    if preamble:
        ds.save_as(buf, enforce_file_format=True)
    else:
        ds.file_meta = FileMetaDataset()
        ds.save_as(buf, implicit_vr=False, little_endian=True)
    return buf.getvalue()


# ----------------------------------------------------------------------------------------------
# Pillow formats


def test_jpeg_png_tiff_in_all_modes(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 255, (40, 60, 3), dtype=np.uint8)
    grey = rng.integers(0, 255, (40, 60), dtype=np.uint8)
    cases = {
        "rgb.jpg": Image.fromarray(rgb, "RGB"),
        "grey.jpg": Image.fromarray(grey, "L"),
        "cmyk.jpg": Image.fromarray(rgb, "RGB").convert("CMYK"),
        "rgb.png": Image.fromarray(rgb, "RGB"),
        "palette.png": Image.fromarray(rgb, "RGB").convert("P"),
        "bilevel.png": Image.fromarray(grey, "L").convert("1"),
        "grey.tif": Image.fromarray(grey, "L"),
        "rgb.tiff": Image.fromarray(rgb, "RGB"),
    }
    for name, im in cases.items():
        im.save(tmp_path / name)
        out = read_image(tmp_path / name)
        assert out.mode == "RGB" and out.size == (60, 40), name
    # Lossless formats keep the exact values.
    assert (_arr(read_image(tmp_path / "rgb.png")) == rgb).all()
    assert (_grey(read_image(tmp_path / "grey.tif")) == grey).all()
    assert (_arr(read_image(tmp_path / "rgb.tiff")) == rgb).all()


@pytest.mark.parametrize("suffix", ["tif", "png"])
def test_16bit_grey_is_scaled_by_its_range(tmp_path: Path, suffix: str) -> None:
    values = np.linspace(1000, 4000, 64 * 32).reshape(32, 64).astype(np.uint16)
    path = tmp_path / f"scan16.{suffix}"
    Image.fromarray(values).save(path)
    assert Image.open(path).mode.startswith("I")
    out = _grey(read_image(path))
    expected = np.rint((values.astype(np.float64) - 1000) / 3000 * 255)
    assert np.abs(out - expected).max() == 0
    assert out.min() == 0 and out.max() == 255  # Pillow's own convert would clip all of it to 255


def test_float_tiff(tmp_path: Path) -> None:
    values = np.linspace(-1.0, 3.0, 100, dtype=np.float32).reshape(10, 10)
    Image.fromarray(values, "F").save(tmp_path / "f.tif")
    out = _grey(read_image(tmp_path / "f.tif"))
    assert out[0, 0] == 0 and out[-1, -1] == 255


def test_transparency_becomes_black(tmp_path: Path) -> None:
    rgba = np.zeros((8, 8, 4), dtype=np.uint8)
    rgba[..., :3] = 200
    rgba[:4, :, 3] = 255  # top half opaque, bottom half fully transparent
    Image.fromarray(rgba, "RGBA").save(tmp_path / "a.png")
    out = _arr(read_image(tmp_path / "a.png"))
    assert (out[:4] == 200).all() and (out[4:] == 0).all()
    Image.fromarray(rgba[..., [0, 3]], "LA").save(tmp_path / "la.png")
    assert (_arr(read_image(tmp_path / "la.png"))[4:] == 0).all()


def test_exif_orientation_is_applied(tmp_path: Path) -> None:
    im = Image.new("RGB", (60, 20), (255, 0, 0))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    im.save(tmp_path / "phone.jpg", exif=exif)
    assert read_image(tmp_path / "phone.jpg").size == (20, 60)


def test_bytes_and_content_detection(tmp_path: Path) -> None:
    buf = io.BytesIO()
    Image.new("L", (16, 16), 77).save(buf, "PNG")
    # A PNG called .jpg, and bytes with only a name: the content decides.
    (tmp_path / "really_png.jpg").write_bytes(buf.getvalue())
    assert _grey(read_image(tmp_path / "really_png.jpg"))[0, 0] == 77
    assert _grey(read_image(buf.getvalue(), "upload.bin"))[0, 0] == 77
    # A DICOM without any suffix, and one named .jpg, are recognised by the DICM marker.
    dcm = Path(_testdata("CT_small.dcm")).read_bytes()
    (tmp_path / "IM0001").write_bytes(dcm)
    (tmp_path / "ct.jpg").write_bytes(dcm)
    assert is_dicom_file(tmp_path / "IM0001") and not is_dicom_file(tmp_path / "really_png.jpg")
    a = _arr(read_image(tmp_path / "IM0001"))
    assert (a == _arr(read_image(tmp_path / "ct.jpg"))).all()
    assert (a == _arr(read_image(dcm, "upload"))).all()


# ----------------------------------------------------------------------------------------------
# Bad files


def _truncated_jpeg() -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(1).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(buf, "JPEG")
    return buf.getvalue()[: len(buf.getvalue()) // 2]


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        ("empty.jpg", b"", "is empty (0 bytes)"),
        ("truncated.jpg", None, "truncated or corrupt image data"),
        ("noise.jpg", bytes(range(256)) * 4, "is not a recognised image"),
        ("notes.txt", b"just some text\n", "is not a recognised image"),
        ("broken.dcm", b"\x00" * 128 + b"DICM" + b"\x02\x00\x10", "DICOM"),
        ("header_only.png", b"\x89PNG\r\n\x1a\n", "corrupt"),
    ],
)
def test_bad_files_raise_clear_errors(tmp_path: Path, name: str, content: bytes | None, message: str) -> None:
    path = tmp_path / name
    path.write_bytes(_truncated_jpeg() if content is None else content)
    with pytest.raises(ImageReadError) as info:
        read_image(path)
    text = str(info.value)
    assert text.startswith(str(path)) and message in text
    assert info.value.hint  # every error says what to do


def test_missing_path_and_folder(tmp_path: Path) -> None:
    with pytest.raises(ImageReadError, match="does not exist"):
        read_image(tmp_path / "absent.png")
    with pytest.raises(ImageReadError, match="not a regular file"):
        read_image(tmp_path)


def test_unsupported_pillow_format(tmp_path: Path) -> None:
    Image.new("RGB", (8, 8)).save(tmp_path / "anim.gif")
    with pytest.raises(ImageReadError, match="GIF image, which is not supported"):
        read_image(tmp_path / "anim.gif")


def test_decompression_bomb_is_refused_before_decoding(tmp_path: Path) -> None:
    Image.new("L", (2000, 1500)).save(tmp_path / "big.png")  # a few KB on disk, 3 MP decoded
    assert (tmp_path / "big.png").stat().st_size < 20_000
    with pytest.raises(ImageReadError, match=r"2000x1500 = 3,000,000 pixels, over the limit of 1,000,000"):
        read_image(tmp_path / "big.png", max_pixels=1_000_000)
    assert read_image(tmp_path / "big.png", max_pixels=3_000_000).size == (2000, 1500)
    # DICOM: the header's Rows x Columns is checked before the pixels are decoded.
    dcm = _dicom_bytes(np.zeros((100, 100)))
    with pytest.raises(ImageReadError, match="over the limit"):
        read_image(dcm, "big.dcm", max_pixels=9_999)


# ----------------------------------------------------------------------------------------------
# DICOM, synthetic with known values


def test_dicom_rescale_then_window() -> None:
    stored = np.arange(0, 1024, dtype=np.uint16).reshape(32, 32)
    # Modality values = 2 * stored - 1000 (-1000..1046); window [-200, 200] around 0.
    dcm = _dicom_bytes(stored, RescaleSlope=2, RescaleIntercept=-1000, WindowCenter=0, WindowWidth=401)
    out = _grey(read_image(dcm, "w.dcm"))
    hu = 2.0 * stored - 1000
    expected = np.rint(np.clip((hu - (0 - 0.5)) / (401 - 1) + 0.5, 0, 1) * 255)
    assert (out == expected).all()
    assert out[hu < -200].max() == 0 and out[hu > 200].min() == 255


def test_dicom_without_window_uses_min_max_and_monochrome1_inverts() -> None:
    stored = np.linspace(100, 900, 16 * 16).reshape(16, 16).astype(np.uint16)
    mono2 = _grey(read_image(_dicom_bytes(stored), "m2.dcm"))
    assert mono2.min() == 0 and mono2.max() == 255
    assert (np.diff(mono2.ravel()) >= 0).all()
    mono1 = _grey(read_image(_dicom_bytes(stored, photometric="MONOCHROME1"), "m1.dcm"))
    assert (mono1 == 255 - mono2).all()


def test_dicom_sigmoid_and_linear_exact_windows() -> None:
    stored = np.arange(0, 256, dtype=np.uint16).reshape(16, 16)
    exact = _grey(
        read_image(
            _dicom_bytes(stored, WindowCenter=128, WindowWidth=64, VOILUTFunction="LINEAR_EXACT"), "e.dcm"
        )
    )
    assert (exact == np.rint(np.clip((stored - 128.0) / 64 + 0.5, 0, 1) * 255)).all()
    sig = _grey(
        read_image(_dicom_bytes(stored, WindowCenter=128, WindowWidth=64, VOILUTFunction="SIGMOID"), "s.dcm")
    )
    assert sig.ravel()[128] in (127, 128) and sig.ravel()[0] < 5 and sig.ravel()[-1] > 250


def test_dicom_multiframe_takes_the_middle_frame() -> None:
    frames = np.stack([np.full((8, 8), 10 * i, dtype=np.uint16) for i in range(5)])
    frames[:, 0, 0] = 0  # give each frame a range so min-max is defined
    frames[:, -1, -1] = 100
    out = _grey(read_image(_dicom_bytes(frames), "cine.dcm"))
    assert out[3, 3] == round(20 / 100 * 255)  # frame 2 of 0..4 holds 20


def test_dicom_without_preamble_is_read_by_its_name() -> None:
    stored = np.arange(64, dtype=np.uint16).reshape(8, 8)
    raw = _dicom_bytes(stored, preamble=False)
    assert raw[128:132] != b"DICM"
    assert _grey(read_image(raw, "old.dcm"))[-1, -1] == 255
    with pytest.raises(ImageReadError, match="not a recognised image"):
        read_image(raw, "old.bin")
    # A real one: pydicom's palette-colour face has no preamble and no file meta at all.
    face = read_image(_testdata("OT-PAL-8-face.dcm"))
    assert face.size == (640, 480) and _arr(face).std(axis=-1).mean() > 1  # it is in colour


# ----------------------------------------------------------------------------------------------
# DICOM, real files bundled with pydicom and pydicom-data


def test_real_ct_rescale_min_max() -> None:
    path = _testdata("CT_small.dcm")
    ds = pydicom.dcmread(path)
    hu = ds.pixel_array * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
    expected = np.rint((hu - hu.min()) / (hu.max() - hu.min()) * 255)
    assert (_grey(read_image(path)) == expected).all()


def test_real_mr_window() -> None:
    path = _testdata("MR_small.dcm")
    ds = pydicom.dcmread(path)
    c, w = float(ds.WindowCenter), float(ds.WindowWidth)
    expected = np.rint(np.clip((ds.pixel_array - (c - 0.5)) / (w - 1) + 0.5, 0, 1) * 255)
    assert (_grey(read_image(path)) == expected).all()


def test_real_chest_radiograph_monochrome1() -> None:
    """pydicom-data's chest CR is MONOCHROME1: lungs (low attenuation) must come out dark."""
    path = _testdata("RG1_UNCR.dcm")
    ds = pydicom.dcmread(path)
    assert ds.PhotometricInterpretation == "MONOCHROME1" and ds.BodyPartExamined == "CHEST"
    out = _grey(read_image(path))
    assert out.shape == (ds.Rows, ds.Columns)
    # The same pixels declared MONOCHROME2 come out exactly inverted.
    ds.PhotometricInterpretation = "MONOCHROME2"
    buf = io.BytesIO()
    ds.save_as(buf)
    assert (_grey(read_image(buf.getvalue(), "as_mono2.dcm")) == 255 - out).all()
    # Lungs (left and right of the centre, at mid height) are darker than the spine between them.
    h, w = out.shape
    lungs = (
        out[h * 2 // 5 : h * 3 // 5, w // 5 : w * 2 // 5].mean()
        + out[h * 2 // 5 : h * 3 // 5, w * 3 // 5 : w * 4 // 5].mean()
    ) / 2
    spine = out[h * 2 // 5 : h * 3 // 5, w * 15 // 32 : w * 17 // 32].mean()
    assert lungs < spine


def test_real_multiframe_mr_middle_frame() -> None:
    path = _testdata("emri_small.dcm")
    ds = pydicom.dcmread(path)
    assert int(ds.NumberOfFrames) == 10
    frame = pixel_array(ds, index=5).astype(np.float64)
    expected = np.rint((frame - frame.min()) / (frame.max() - frame.min()) * 255)
    assert (_grey(read_image(path)) == expected).all()


def test_real_enhanced_ct_uses_its_functional_groups() -> None:
    """Enhanced CT keeps rescale and window in functional groups: the window (49/102 HU) must apply."""
    path = _testdata("eCT_Supplemental.dcm")
    ds = pydicom.dcmread(path)
    assert "WindowCenter" not in ds and int(ds.NumberOfFrames) == 2
    transform = ds.SharedFunctionalGroupsSequence[0].PixelValueTransformationSequence[0]
    window = ds.SharedFunctionalGroupsSequence[0].FrameVOILUTSequence[0]
    hu = pixel_array(ds, index=1) * float(transform.RescaleSlope) + float(transform.RescaleIntercept)
    c, w = float(window.WindowCenter), float(window.WindowWidth)
    expected = np.rint(np.clip((hu - (c - 0.5)) / (w - 1) + 0.5, 0, 1) * 255)
    out = _grey(read_image(path))
    assert (out == expected).all()
    assert (out == 0).mean() > 0.2 and (out == 255).any()  # a soft-tissue window clips air and bone


def test_real_colour_dicoms() -> None:
    rgb = _arr(read_image(_testdata("SC_rgb.dcm")))
    # The same picture stored as YBR_FULL_422, 16-bit RGB, RLE and lossy JPEG (YBR) decode alike.
    # (4:2:2 halves the horizontal colour resolution, so allow a little at colour edges.)
    assert np.abs(_arr(read_image(_testdata("SC_ybr_full_422_uncompressed.dcm"))) - rgb).mean() < 1
    assert np.abs(_arr(read_image(_testdata("SC_rgb_16bit.dcm"))) - rgb).max() <= 1
    assert np.abs(_arr(read_image(_testdata("SC_rgb_rle_16bit.dcm"))) - rgb).max() <= 1
    assert np.abs(_arr(read_image(_testdata("SC_rgb_jpeg_dcmtk.dcm"))) - rgb).mean() < 3
    # Ultrasound: RGB, YBR_FULL_422 JPEG multi-frame, and palette colour (with colour Doppler).
    for name in ("US1_UNCR.dcm", "examples_rgb_color.dcm", "examples_ybr_color.dcm", "examples_palette.dcm"):
        im = read_image(_testdata(name))
        a = _arr(im)
        assert im.size[0] >= 320 and (a.max(axis=-1) - a.min(axis=-1)).max() > 50, name  # real colour


def test_real_two_frame_palette_and_rgb() -> None:
    one = _arr(read_image(_testdata("SC_rgb.dcm")))
    two = _arr(read_image(_testdata("SC_rgb_2frame.dcm")))
    ds = pydicom.dcmread(_testdata("SC_rgb_2frame.dcm"))
    assert (two == pixel_array(ds, index=1)).all()  # frame 1 of 0..1 is the middle one
    assert two.shape == one.shape
    assert read_image(_testdata("OBXXXX1A_2frame.dcm")).size == (800, 600)


def test_real_voi_and_modality_lut_sequences() -> None:
    for name in ("vlut_04.dcm", "mlut_18.dcm"):
        out = _grey(read_image(_testdata(name)))
        assert out.min() < 10 and out.max() > 245, name  # the SMPTE pattern spans black to white


def test_compressed_dicom_needs_a_plugin_message() -> None:
    path = _testdata("MR_small_jpeg_ls_lossless.dcm")
    ds = pydicom.dcmread(path)
    if get_decoder(ds.file_meta.TransferSyntaxUID).is_available:
        assert read_image(path).size == (64, 64)
        return
    with pytest.raises(ImageReadError) as info:
        read_image(path)
    text = str(info.value)
    assert "JPEG-LS" in text and "no decoder plugin" in text and "pip install" in text


def test_compressed_dicoms_that_decode_here() -> None:
    # RLE (pydicom itself) and JPEG 2000 (Pillow's OpenJPEG) decode without extra plugins.
    rle = _grey(read_image(_testdata("MR_small_RLE.dcm")))
    assert (rle == _grey(read_image(_testdata("MR_small.dcm")))).all()
    assert read_image(_testdata("JPEG2000.dcm")).size == (256, 1024)


def test_non_image_and_truncated_dicom() -> None:
    with pytest.raises(ImageReadError, match="holds no image .*RT Plan"):
        read_image(_testdata("rtplan.dcm"))
    with pytest.raises(ImageReadError, match="less than expected"):
        read_image(_testdata("MR_truncated.dcm"))
