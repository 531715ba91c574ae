"""diffsynth.data: lazy VideoData (video files and image folders), crop_and_resize, natural sort, writers.

Test videos are written here with imageio-ffmpeg directly (not with our writer), each
frame carrying its index as a row of black/white blocks (one bit per block, wide enough
to survive H.264) above a pure red band (to catch RGB/BGR mix-ups).
"""
import logging
import os
import pickle
import random
import threading
import tracemalloc

import imageio_ffmpeg
import numpy as np
import pytest
from PIL import Image

from diffsynth.data import (LowMemoryImageFolder, UnreadableVideoError, VideoData, crop_and_resize, natural_sort_key,
                            save_frames, save_video, search_for_images)

FPS = 10


# ---------------------------------------------------------------------------- coded frames and videos


def coded_frame(index, width=96, height=64, bits=6, noise_seed=None):
    """A frame whose top band encodes ``index`` in ``bits`` blocks; red band below; optional noise band at the bottom."""
    frame = np.zeros((height, width, 3), np.uint8)
    band, block = height * 5 // 8, width // bits
    for bit in range(bits):
        if index >> bit & 1:
            frame[:band, bit * block:(bit + 1) * block] = 255
    frame[band:, :] = (255, 0, 0)
    if noise_seed is not None:  # incompressible rows make every frame about the same number of bytes
        rows = np.random.default_rng(noise_seed + index).integers(0, 256, (height // 4, width, 3), dtype=np.uint8)
        frame[height - height // 4:] = rows
    return frame


def decode_index(image, bits=6):
    array = np.asarray(image)
    height, width = array.shape[:2]
    block = width // bits
    row = height * 5 // 16
    return sum(1 << bit for bit in range(bits) if array[row, bit * block + block // 2].mean() > 128)


def write_video(path, frames, width, height, output_params=()):
    writer = imageio_ffmpeg.write_frames(str(path), (width, height), fps=FPS, quality=8, macro_block_size=1,
                                         ffmpeg_log_level="error", output_params=list(output_params))
    writer.send(None)
    for frame in frames:
        writer.send(np.ascontiguousarray(frame))
    writer.close()
    return str(path)


def read_back(path):
    """All frames of a video via imageio-ffmpeg (independent of diffsynth), with its metadata."""
    reader = imageio_ffmpeg.read_frames(str(path))
    meta = next(reader)
    width, height = meta["size"]
    return meta, [np.frombuffer(raw, np.uint8).reshape(height, width, 3) for raw in reader]


@pytest.fixture(scope="module")
def video40(tmp_path_factory):
    path = tmp_path_factory.mktemp("video") / "coded.mp4"
    return write_video(path, (coded_frame(i) for i in range(40)), 96, 64)


@pytest.fixture(scope="module")
def truncated_video(tmp_path_factory):
    """40 frames in the header, the tail of the data cut off: the header overstates the frame count.

    ``+faststart`` puts the index (moov) before the data, so the cut leaves a readable file;
    ``-bf 0`` (no B-frames) makes the surviving frames exactly a prefix of the original ones.
    """
    folder = tmp_path_factory.mktemp("truncated")
    full = write_video(folder / "full.mp4", (coded_frame(i, noise_seed=0) for i in range(40)), 96, 64,
                       output_params=["-movflags", "+faststart", "-bf", "0"])
    data = open(full, "rb").read()
    path = folder / "truncated.mp4"
    path.write_bytes(data[: int(len(data) * 0.6)])
    return str(path)


# ---------------------------------------------------------------------------- lazy video reading


def test_len_frames_and_colours(video40):
    video = VideoData(video_file=video40)
    assert len(video) == 40
    assert video.fps == FPS
    assert video.shape() == (64, 96)
    frames = [video[i] for i in range(40)]
    assert all(frame.mode == "RGB" and frame.size == (96, 64) for frame in frames)
    assert [decode_index(frame) for frame in frames] == list(range(40))
    red = np.asarray(frames[0])[56, 48].astype(int)
    assert red[0] > 200 and red[1] < 60 and red[2] < 60


def test_backward_random_and_negative_access(video40):
    video = VideoData(video_file=video40)
    order = [39, 0, 20, 19, 5, 38, 1, 37, 36, 2]
    order += random.Random(0).sample(range(40), 15)
    assert [decode_index(video[i]) for i in order] == order
    assert decode_index(video[-1]) == 39 and decode_index(video[-40]) == 0
    with pytest.raises(IndexError):
        video[40]
    with pytest.raises(IndexError):
        video[-41]


def test_iteration_streams_to_the_end_without_len(video40):
    video = VideoData(video_file=video40)
    assert [decode_index(frame) for frame in video] == list(range(40))
    assert len(video) == 40


def test_range_views_are_lazy_and_compose(video40):
    video = VideoData(video_file=video40)
    view = video.range(10, 20)
    assert decode_index(view[0]) == 10 and decode_index(view[-1]) == 19
    assert len(view) == 10
    with pytest.raises(IndexError):
        view[10]
    assert [decode_index(frame) for frame in view] == list(range(10, 20))
    assert [decode_index(frame) for frame in view.range(2, 4)] == [12, 13]
    past_end = video.range(35, 100)  # the end clamps to the decodable frames, without errors
    assert len(past_end) == 5
    assert [decode_index(frame) for frame in past_end] == list(range(35, 40))
    assert [decode_index(frame) for frame in video[5:8]] == [5, 6, 7]
    assert [decode_index(frame) for frame in video[-3:]] == [37, 38, 39]
    assert len(video.range(40)) == 0
    with pytest.raises(ValueError):
        video.range(5, 2)


def test_height_width_apply_crop_and_resize(video40):
    native = VideoData(video_file=video40)
    square = VideoData(video_file=video40, height=32, width=32)
    assert square[3].size == (32, 32) and square.shape() == (32, 32)
    assert np.array_equal(np.asarray(square[3]), np.asarray(crop_and_resize(native[3], 32, 32)))


def test_reader_survives_pickling(video40):
    video = VideoData(video_file=video40)
    video[5]
    copy = pickle.loads(pickle.dumps(video))
    assert decode_index(copy[7]) == 7 and decode_index(video[6]) == 6


def test_header_overstating_the_frame_count_ends_cleanly(truncated_video, caplog):
    caplog.set_level(logging.WARNING, logger="diffsynth")
    streamed = VideoData(video_file=truncated_video)
    indices = [decode_index(frame) for frame in streamed]  # no len() first: reads until the first undecodable frame
    assert 0 < len(indices) < 40
    assert indices == list(range(len(indices)))
    assert any("header suggests about 40 frames" in record.getMessage() for record in caplog.records)

    caplog.clear()
    counted = VideoData(video_file=truncated_video)
    assert len(counted) == len(indices)  # counted by decoding, not from the header
    assert any("truncated" in record.getMessage() for record in caplog.records)
    assert decode_index(counted[-1]) == len(indices) - 1
    with pytest.raises(IndexError):
        counted[len(indices)]
    assert len(counted.range(0, 40)) == len(indices)


def test_errors_name_the_problem(tmp_path, video40):
    with pytest.raises(ValueError, match="needs a source"):
        VideoData()
    with pytest.raises(FileNotFoundError, match="nope.mp4"):
        VideoData(video_file=tmp_path / "nope.mp4")
    with pytest.raises(FileNotFoundError, match="no_folder"):
        VideoData(image_folder=tmp_path / "no_folder")
    not_a_video = tmp_path / "notes.mp4"
    not_a_video.write_text("this is not a video")
    with pytest.raises(UnreadableVideoError, match="notes.mp4"):
        VideoData(video_file=not_a_video)
    with pytest.raises(ValueError, match="not both"):
        VideoData(video_file=video40, image_folder=tmp_path)
    with pytest.raises(ValueError, match="both height and width"):
        VideoData(video_file=video40, height=64)


# ---------------------------------------------------------------------------- crop_and_resize, natural sort, folders


def _gradient(width, height):
    xs, ys = np.meshgrid(np.arange(width), np.arange(height))
    return Image.fromarray(np.stack([xs % 256, ys % 256, (xs * 7 + ys * 3) % 256], -1).astype(np.uint8))


def test_crop_and_resize_16_9_to_square_crops_the_width():
    image = _gradient(161, 90)
    # 90/161 < 64/64: keep the height, crop the width to int(90/64*64) = 90 from (161-90)//2 = 35 (floored)
    expected = image.crop((35, 0, 125, 90)).resize((64, 64), Image.Resampling.BICUBIC)
    assert np.array_equal(np.asarray(crop_and_resize(image, 64, 64)), np.asarray(expected))


def test_crop_and_resize_square_to_16_9_crops_the_height():
    image = _gradient(101, 101)
    # 101/101 >= 36/64: keep the width, crop the height to int(101/64*36) = int(56.81) = 56 (truncated, not
    # rounded) from (101-56)//2 = 22 (floored)
    expected = image.crop((0, 22, 101, 78)).resize((64, 36), Image.Resampling.BICUBIC)
    result = crop_and_resize(image, 36, 64)
    assert result.size == (64, 36)
    assert np.array_equal(np.asarray(result), np.asarray(expected))
    assert crop_and_resize(image, 101, 101) is image


def test_natural_sort_handles_mixed_names(tmp_path):
    names = ["frame10.png", "frame2.png", "a.png", "1.png", "frame1.PNG", "b.JPEG", "10.jpg", "frame2b.png"]
    for name in names + ["notes.txt", ".hidden.png"]:
        (tmp_path / name).write_bytes(b"")
    (tmp_path / "sub.png").mkdir()
    found = [os.path.basename(path) for path in search_for_images(tmp_path)]
    assert found == ["1.png", "10.jpg", "a.png", "b.JPEG", "frame1.PNG", "frame2.png", "frame2b.png", "frame10.png"]
    assert sorted(["x01", "x1", "X1"], key=natural_sort_key) == ["X1", "x01", "x1"]  # ties broken by the raw name


def test_image_folder_frames(tmp_path):
    for index in [0, 1, 2, 10, 11]:
        Image.fromarray(coded_frame(index)).save(tmp_path / f"frame{index}.png")
    video = VideoData(image_folder=tmp_path)
    assert video.fps is None and len(video) == 5
    assert [decode_index(frame) for frame in video] == [0, 1, 2, 10, 11]
    assert decode_index(video[-1]) == 11
    listed = VideoData(image_folder=tmp_path, file_list=["frame2.png", "frame0.png"], height=32, width=48)
    assert [frame.size for frame in listed] == [(48, 32), (48, 32)]
    with pytest.raises(FileNotFoundError, match="missing.png"):
        LowMemoryImageFolder(tmp_path, ["missing.png"])
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no frame images"):
        VideoData(image_folder=tmp_path / "empty")


# ---------------------------------------------------------------------------- writers


def test_save_video_round_trip_from_a_list_and_a_video(tmp_path, video40):
    frames = [Image.fromarray(coded_frame(i)) for i in range(20)]
    totals = []

    def progress(items, total=None, desc=None):
        totals.append(total)
        return items

    path = tmp_path / "out" / "video.mp4"
    assert save_video(frames, path, fps=FPS, progress_bar_cmd=progress) == 20
    meta, decoded = read_back(path)
    assert meta["size"] == (96, 64) and meta["fps"] == FPS and totals == [20]
    assert [decode_index(frame) for frame in decoded] == list(range(20))
    assert np.abs(decoded[3].astype(int) - coded_frame(3).astype(int)).mean() < 4

    save_video(VideoData(video_file=video40).range(30, 40), tmp_path / "tail.mkv", fps=FPS, ffmpeg_params=["-preset", "ultrafast"])
    assert [decode_index(frame) for frame in read_back(tmp_path / "tail.mkv")[1]] == list(range(30, 40))


def test_save_video_is_atomic(tmp_path):
    path = tmp_path / "video.mp4"

    def frames_then_crash():
        for i in range(5):
            yield coded_frame(i)
        raise RuntimeError("frame source failed")

    with pytest.raises(RuntimeError, match="frame source failed"):
        save_video(frames_then_crash(), path, fps=FPS)
    assert os.listdir(tmp_path) == []

    path.write_bytes(b"previous video")
    with pytest.raises(ValueError, match="frame 2 is 48x32"):
        save_video([coded_frame(0), coded_frame(1), coded_frame(2, width=48, height=32)], path, fps=FPS)
    assert os.listdir(tmp_path) == ["video.mp4"] and path.read_bytes() == b"previous video"
    with pytest.raises(OSError, match="invalid preset"):
        save_video([coded_frame(i) for i in range(20)], path, fps=FPS, ffmpeg_params=["-preset", "nonsense"])
    assert os.listdir(tmp_path) == ["video.mp4"] and path.read_bytes() == b"previous video"
    with pytest.raises(ValueError, match="no frames"):
        save_video([], path, fps=FPS)
    with pytest.raises(ValueError, match="extensions"):
        save_video([coded_frame(0)], tmp_path / "video.tmp", fps=FPS)


def test_save_video_pads_odd_sizes(tmp_path, caplog):
    caplog.set_level(logging.WARNING, logger="diffsynth")
    frames = [coded_frame(i, width=95, height=63) for i in range(6)]
    save_video(iter(frames), tmp_path / "odd.mp4", fps=FPS)
    meta, decoded = read_back(tmp_path / "odd.mp4")
    assert meta["size"] == (96, 64) and len(decoded) == 6
    assert np.abs(decoded[4][:63, :95].astype(int) - frames[4].astype(int)).mean() < 4
    assert any("padding to 96x64" in record.getMessage() for record in caplog.records)


def test_save_frames_names_and_content(tmp_path):
    frames = [Image.fromarray(coded_frame(i)) for i in range(3)]
    assert save_frames(frames, tmp_path / "plain") == 3
    assert sorted(os.listdir(tmp_path / "plain")) == ["0.png", "1.png", "2.png"]
    save_frames(iter(frames), tmp_path / "padded", start=9, zero_pad=4)
    assert sorted(os.listdir(tmp_path / "padded")) == ["0009.png", "0010.png", "0011.png"]
    assert np.array_equal(np.asarray(Image.open(tmp_path / "padded" / "0010.png")), coded_frame(1))
    save_frames([coded_frame(5)], tmp_path / "arrays")
    assert decode_index(Image.open(tmp_path / "arrays" / "0.png")) == 5


class IndexedFrames:
    """A store-like source: ``len`` and ``[i]`` only, raising KeyError (not IndexError) past the end."""

    def __init__(self, count):
        self.count = count

    def __len__(self):
        return self.count

    def __getitem__(self, index):
        if not 0 <= index < self.count:
            raise KeyError(index)
        return Image.fromarray(coded_frame(index))


def test_writers_read_indexable_sources_by_len(tmp_path):
    assert save_frames(IndexedFrames(3), tmp_path / "frames") == 3
    assert save_video(IndexedFrames(4), tmp_path / "video.mp4", fps=FPS) == 4
    assert [decode_index(frame) for frame in read_back(tmp_path / "video.mp4")[1]] == [0, 1, 2, 3]


# ---------------------------------------------------------------------------- memory


def _rss_bytes():
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


@pytest.fixture(scope="module")
def video300(tmp_path_factory):
    frames = (coded_frame(i, width=256, height=256, bits=9) for i in range(300))
    return write_video(tmp_path_factory.mktemp("long") / "long.mp4", frames, 256, 256)


def test_far_jumps_and_concurrent_readers(video300):
    video = VideoData(video_file=video300)
    assert [decode_index(video[i], bits=9) for i in (3, 250, 251, 120, 299, 0)] == [3, 250, 251, 120, 299, 0]
    results = {}

    def read(name, start, end):
        results[name] = [decode_index(frame, bits=9) for frame in video.range(start, end)]

    threads = [threading.Thread(target=read, args=(name, start, start + 40)) for name, start in (("a", 10), ("b", 200))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert results == {"a": list(range(10, 50)), "b": list(range(200, 240))}


@pytest.mark.skipif(not os.path.exists("/proc/self/statm"), reason="needs Linux /proc for RSS")
def test_sequential_reading_keeps_memory_flat(video300):
    frame_bytes = 256 * 256 * 3
    video = VideoData(video_file=video300)
    for frame in video.range(0, 20):  # warm up allocators and the decoder
        decode_index(frame, bits=9)
    rss_before = _rss_bytes()
    tracemalloc.start()
    try:
        seen = [decode_index(frame, bits=9) for frame in video]
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    rss_growth = _rss_bytes() - rss_before
    assert seen == list(range(300))
    all_frames = 300 * frame_bytes  # ~59 MB of pixels if the reader kept every frame (~80 MB of RSS measured)
    assert peak < 20 * frame_bytes, f"traced peak {peak / 1e6:.1f} MB"  # numpy/bytes buffers (PIL's are untraced)
    assert rss_growth < all_frames / 3, f"RSS grew {rss_growth / 1e6:.1f} MB"
