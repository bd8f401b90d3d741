"""Real photos at the model's speed: camera-sized JPEGs decode at the size the model needs (vectors as a full decode
gives them), index with default flags in bounded memory, and a request of many large photos fits its budget; HEIC
and AVIF decode upright under all eight EXIF orientations, under the same safety rules."""

from __future__ import annotations

import io
import re
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import grpc
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from cli_runner import run_cli
from PIL import Image, ImageOps
from serving import tiny_server

from embedsvc.client import Client, EmbedsvcClientError, Item
from embedsvc.datasets.photos import CAMERA_48MP, encode, photo, photo_image
from embedsvc.encoder import ClipEncoder, decode_image
from embedsvc.engine.config import EngineConfig
from embedsvc.engine.engine import check_pixel_budget, decode_for_model
from embedsvc.errors import ImageDecodeError, ImageTooLarge
from embedsvc.models import load_model
from embedsvc.store import LocalStore

ORIENTATIONS = range(1, 9)
# Runs argv[1:] and prints its peak RSS. Through this small process, not straight from pytest: a child's
# ru_maxrss starts from the high-water mark of the process it was forked from (pytest holds models).
MEASURED = (
    "import resource, subprocess, sys; code = subprocess.call(sys.argv[1:]); "
    "print('peak-rss-kib', resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, file=sys.stderr); "
    "sys.exit(code)"
)


@pytest.fixture(scope="module")
def photos() -> list[bytes]:
    """Six 12 MP JPEGs (q90) of six different real photos."""
    return [photo(i) for i in range(6)]


# -- decoding at the model's size ----------------------------------------------------------------------------


@pytest.mark.parametrize("short_side", [72, 224])
def test_a_large_photo_decodes_near_the_models_size(photos, short_side):
    from embedsvc.encoder.images import REDUCING_GAP, decoded_pixels

    most = 2 * REDUCING_GAP * short_side  # reduced by whole factors while the shorter side stays >= half this
    jpeg = decode_image(photos[0], short_side=short_side)
    assert short_side <= min(jpeg.size) < most and jpeg.size[0] > jpeg.size[1], jpeg.size
    # the header says how many pixels the decoder will produce (the JPEG's DCT scale, before the reduction)
    assert decoded_pixels(photos[0], short_side) == 500 * 375
    png = io.BytesIO()
    photo_image(0, (2000, 1500)).save(png, format="PNG")
    reduced = decode_image(png.getvalue(), short_side=short_side)  # no DCT scaling: decoded whole, reduced at once
    assert short_side <= min(reduced.size) < most, reduced.size
    assert decoded_pixels(png.getvalue(), short_side) == 2000 * 1500


def test_a_multi_picture_jpeg_decodes_scaled_too():
    """MPO: a JPEG with more pictures after the first, as phones write them (depth maps, HDR gain maps)."""
    first, second = photo_image(0, (1600, 1200)), photo_image(1, (400, 300))
    buffer = io.BytesIO()
    first.save(buffer, format="MPO", save_all=True, append_images=[second])
    decoded = decode_image(buffer.getvalue(), short_side=72)
    assert decoded.size == (200, 150)  # the first picture at 1/8
    expected = first.resize((200, 150), Image.Resampling.BOX)
    assert np.abs(np.asarray(decoded, dtype=float) - np.asarray(expected, dtype=float)).mean() < 6


@pytest.mark.parametrize("model", ["bundled_encoder", "vit_b32"])
def test_vectors_of_the_fast_decode_match_a_full_decode_and_the_models_own_transform(request, photos, model):
    encoder = request.getfixturevalue(model)
    side = encoder.loaded.image_size
    fast = encoder.encode_images([decode_image(p, short_side=side) for p in photos]).native
    whole = torch.stack([encoder.loaded.preprocess(decode_image(p)) for p in photos])  # full decode, whole transform
    full = encoder.encode_images(whole).native
    cosine = F.cosine_similarity(fast, full).numpy()
    assert cosine.min() >= 0.99 and np.median(cosine) >= 0.995, cosine


def test_header_limit_and_decoded_limit_are_separate(photos):
    # 12 MP declared, 0.19 MP decoded at 1/8: the decoded size is what max_pixels bounds ...
    assert decode_image(photos[0], max_pixels=200_000, short_side=224).size == (500, 375)
    with pytest.raises(ImageTooLarge, match="decoded, over the limit of 100,000"):
        decode_image(photos[0], max_pixels=100_000, short_side=224)
    # ... and what the file declares is bounded too (a decompression-bomb guard), before anything is decoded
    with pytest.raises(ImageTooLarge, match="declares 4000x3000 = 12,000,000 pixels, over the limit of 10,000,000"):
        decode_image(photos[0], short_side=224, max_header_pixels=10_000_000)


# -- HEIC / AVIF, EXIF orientation ---------------------------------------------------------------------------


def _quadrants(size=(120, 80)) -> Image.Image:
    """Four flat quadrants of distinct colours: any turn or flip moves them."""
    w, h = size
    a = np.zeros((h, w, 3), dtype=np.uint8)
    a[: h // 2, : w // 2] = (230, 30, 30)
    a[: h // 2, w // 2 :] = (30, 230, 30)
    a[h // 2 :, : w // 2] = (30, 30, 230)
    a[h // 2 :, w // 2 :] = (230, 230, 30)
    return Image.fromarray(a)


def _encoded(image: Image.Image, fmt: str, orientation: int) -> bytes:
    return encode(image, fmt, 95, orientation)


@pytest.mark.parametrize("fmt", ["HEIF", "AVIF"])
@pytest.mark.parametrize("orientation", ORIENTATIONS)
def test_heic_and_avif_decode_upright_like_png(fmt, orientation):
    image = _quadrants()
    expected = np.asarray(decode_image(_encoded(image, "PNG", orientation)), dtype=float)
    decoded = decode_image(_encoded(image, fmt, orientation))
    assert decoded.mode == "RGB" and decoded.size == (expected.shape[1], expected.shape[0])
    if orientation in (5, 6, 7, 8):
        assert decoded.size == (80, 120)  # turned a quarter
    assert np.abs(np.asarray(decoded, dtype=float) - expected).mean() < 6


@pytest.mark.parametrize("fmt", ["JPEG", "HEIF", "AVIF"])
@pytest.mark.parametrize("orientation", ORIENTATIONS)
def test_orientation_holds_when_decoding_at_the_models_size(fmt, orientation):
    """Draft sizes refer to the stored orientation: the image is scaled, then turned."""
    image = _quadrants((1200, 800))
    decoded = decode_image(_encoded(image, fmt, orientation), short_side=32)
    expected = ImageOps.exif_transpose(Image.open(io.BytesIO(_encoded(image, "PNG", orientation)))).convert("RGB")
    expected = expected.resize(decoded.size, Image.Resampling.BOX)
    assert min(decoded.size) <= 200  # decoded small (JPEG: DCT scale; HEIF and AVIF: whole, then reduced)
    assert np.abs(np.asarray(decoded, dtype=float) - np.asarray(expected, dtype=float)).mean() < 6


@pytest.mark.parametrize("fmt", ["HEIF", "AVIF"])
def test_heic_and_avif_follow_the_safety_rules(fmt):
    data = _encoded(_quadrants((200, 150)), fmt, 1)
    with pytest.raises(ImageTooLarge, match="over the limit of 10,000"):  # header-first
        decode_image(data, max_pixels=10_000)
    with pytest.raises(ImageTooLarge, match="declares 200x150"):
        decode_image(data, max_header_pixels=10_000)
    for cut in (len(data) // 2, len(data) - 10):
        with pytest.raises(ImageDecodeError, match="corrupt or truncated"):
            decode_image(data[:cut])


# -- bulk indexing: default flags, bounded memory ------------------------------------------------------------


def test_a_folder_of_large_photos_indexes_with_default_flags_in_bounded_memory(tmp_path, photos):
    """41 x 12 MP + one 48 MP JPEG (540 MP declared: over max_request_pixels in one default batch of 64),
    a HEIC and an AVIF. The job's peak RSS stays bounded (torch, open_clip and FAISS alone take ~0.9 GiB):
    decoded images are model-sized, not 36 MB each."""
    folder = tmp_path / "photos"
    folder.mkdir()
    distinct = photos[:3]
    for k in range(41):
        (folder / f"p{k:02d}.jpg").write_bytes(distinct[k % 3])
    (folder / "big.jpg").write_bytes(photo(3, CAMERA_48MP))
    (folder / "phone.heic").write_bytes(photo(4, (1600, 1200), fmt="HEIF", orientation=6))
    (folder / "web.avif").write_bytes(photo(5, (1600, 1200), fmt="AVIF"))
    proc = subprocess.run(
        [
            sys.executable,
            "-c",
            MEASURED,
            sys.executable,
            "-m",
            "embedsvc",
            "index",
            str(folder),
            "--collection",
            "p=cls",
            "--local",
            str(tmp_path / "d"),
        ],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "indexed 44, already present 0, failed 0 of 44" in proc.stdout, proc.stdout + proc.stderr
    peak_mib = int(proc.stderr.rsplit("peak-rss-kib ", 1)[1]) / 1024
    assert peak_mib < 1536, f"peak RSS of the index job {peak_mib:.0f} MiB"
    store = LocalStore(tmp_path / "d")
    assert store.get_collection("p").count == 44
    store.close(checkpoint=False)


def test_a_negative_reader_count_is_a_clear_error(tmp_path):
    proc = run_cli("index", str(tmp_path), "--collection", "p=cls", "--local", str(tmp_path / "d"), "--workers", "-1")
    assert proc.returncode == 2 and "--workers must be at least 1 (or 0 for one per CPU)" in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr


def test_batches_split_by_their_pixels():
    from embedsvc.jobs.index import split_by_pixels

    rows = [5, 5, 5, 12, 1, 1]
    assert split_by_pixels(rows, lambda n: n, 10) == [[5, 5], [5], [12], [1, 1]]
    assert split_by_pixels(rows, lambda n: n, 100) == [rows]
    assert split_by_pixels([], lambda n: n, 10) == []


# -- the request path ----------------------------------------------------------------------------------------


def test_a_request_of_large_photos_fits_the_decoded_pixel_budget(tiny_spec, tmp_path, photos):
    """max_request_pixels counts decoded pixels: three 12 MP JPEGs (36 MP in their headers) decode at 1/8 for a
    32-pixel model and fit a 5 MP budget; a PNG, decoded whole, counts whole."""
    png = io.BytesIO()
    photo_image(0, (2400, 1800)).save(png, format="PNG")
    with (
        tiny_server(tiny_spec, tmp_path / "d", max_request_pixels=5_000_000) as server,
        Client(server.address, timeout=120) as client,
    ):
        served = client.embed(photos[:3]).vectors["cls"]
        client.create_collection("c")
        assert client.upsert("c", [Item(str(k), image=p) for k, p in enumerate(photos[:3])]).count == 3
        with pytest.raises(EmbedsvcClientError) as info:
            client.embed([png.getvalue(), png.getvalue()])
        assert info.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "8,640,000 decoded pixels" in info.value.details and "max_request_pixels" in info.value.details
    encoder = ClipEncoder(load_model(tiny_spec))
    local = F.normalize(
        encoder.encode_images([decode_image(p, short_side=encoder.loaded.image_size) for p in photos[:3]]).native,
        dim=-1,
    ).numpy()
    assert np.abs(served - local).max() < 1e-5  # the server decodes through the same function


class CountingPool(ThreadPoolExecutor):
    """A real thread pool that counts the jobs handed to it."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.jobs = 0

    def submit(self, *args, **kwargs):
        self.jobs += 1
        return super().submit(*args, **kwargs)


def test_one_photo_is_checked_and_decoded_in_one_trip_through_the_decode_pool(tiny_spec, tmp_path, photos, monkeypatch):
    """A one-photo Embed wakes a decode thread once, not once for the pixel budget and again for the decode (on a
    busy machine each wake-up waits for a core), and reads its header once: its budget is still checked from the
    header before decoding. A request of several images still checks the whole request's budget before it decodes
    any."""
    png = io.BytesIO()
    photo_image(0, (2400, 1800)).save(png, format="PNG")
    opened = []
    real_open = Image.open

    def counting_open(*args, **kwargs):
        opened.append(1)
        return real_open(*args, **kwargs)

    with (
        tiny_server(tiny_spec, tmp_path / "d", max_request_pixels=4_000_000) as server,
        Client(server.address, timeout=120) as client,
    ):
        engine = server.server.engine
        pool = engine.decode_pool = CountingPool(2)
        monkeypatch.setattr(Image, "open", counting_open)
        client.embed(photos[:1])
        assert pool.jobs == 1 and len(opened) == 1
        client.embed(photos[:2])
        assert pool.jobs == 1 + 3  # the request's budget, then each image
        with pytest.raises(EmbedsvcClientError) as info:  # 4,320,000 decoded pixels, over the budget
            client.embed([png.getvalue()])
        assert info.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED and "max_request_pixels" in info.value.details
        with pytest.raises(EmbedsvcClientError) as info:
            client.embed([photos[0][:2000]])
        assert info.value.code == grpc.StatusCode.INVALID_ARGUMENT and "input 0" in info.value.details
        pool.shutdown()


@pytest.mark.parametrize(
    "limits",
    [
        {},
        {"max_request_pixels": 150_000},  # under a 12 MP JPEG's 1/8 decode (187,500), over a small PNG's
        {"max_request_pixels": 10_000},
        {"max_request_pixels": 150_000, "max_image_header_pixels": 1_000_000},
        {"max_image_pixels": 100_000, "max_request_pixels": 150_000},
    ],
)
def test_a_lone_image_is_refused_or_decoded_as_a_request_of_one_was(photos, limits):
    """decode_for_model's `lone` (the budget checked on the header the decode opens) gives what the request-wide
    check before the decode gives, the same error first: for a photo, a truncated one, PNGs, a decoded image and
    bytes that are no image."""
    png = io.BytesIO()
    photo_image(1, (600, 400)).save(png, format="PNG")
    payloads = [photos[0], photos[0][:2000], png.getvalue(), b"not an image", photo_image(2, (900, 600))]
    config = EngineConfig(**limits)

    def prepare(image):
        return torch.from_numpy(np.asarray(image).copy())

    def outcome(run):
        try:
            return run()
        except Exception as exc:  # noqa: BLE001 - the outcome compared is the error itself
            return type(exc), re.sub(r" at 0x[0-9a-f]+", "", str(exc))  # Pillow names its BytesIO by address

    for payload in payloads:

        def two_steps(payload=payload):
            check_pixel_budget(config, [payload], 32)
            return decode_for_model(config, 32, prepare, payload, "input 0")

        expected = outcome(two_steps)
        got = outcome(lambda payload=payload: decode_for_model(config, 32, prepare, payload, "input 0", lone=True))
        if isinstance(expected, torch.Tensor):
            assert isinstance(got, torch.Tensor) and torch.equal(got, expected)
        else:
            assert got == expected
