import numpy as np
import pytest
import torch

from mimir.video import VideoReadError, read_video, resize_center_crop, write_video


def counting_clip(frames=9, height=32, width=48):
    """Flat-colour frames whose red channel encodes the frame index: 20 * i."""
    clip = torch.zeros(frames, height, width, 3, dtype=torch.uint8)
    clip[..., 0] = (20 * torch.arange(frames, dtype=torch.uint8))[:, None, None]
    clip[..., 1] = 120
    clip[..., 2] = 200
    return clip


def test_mp4_round_trip_keeps_count_size_and_flat_colours(tmp_path):
    clip = counting_clip()
    path = write_video(clip.float() / 255, tmp_path / "clip.mp4", fps=8)
    back = read_video(path)
    assert back.dtype == torch.uint8 and back.shape == (9, 32, 48, 3)
    assert (back.int() - clip.int()).abs().max() <= 4  # H.264 crf 18 + yuv420p on flat colours


def test_read_video_selects_start_stride_and_count(tmp_path):
    path = write_video(counting_clip(), tmp_path / "clip.mp4")
    back = read_video(path, num_frames=4, stride=2, start=1)
    red = back[..., 0].float().mean(dim=(1, 2))
    assert back.shape[0] == 4
    assert torch.allclose(red, torch.tensor([20.0, 60.0, 100.0, 140.0]), atol=3)
    assert read_video(path, start=6).shape[0] == 3


def test_webp_round_trip_is_lossless_and_keeps_repeated_frames(tmp_path):
    clip = counting_clip(frames=9)
    clip[3:6] = clip[3]  # identical consecutive frames get merged by the encoder and must come back
    for fps in (8, 24):
        back = read_video(write_video(clip, tmp_path / f"clip{fps}.webp", fps=fps))
        assert torch.equal(back, clip)


def test_gif_round_trip_keeps_frame_count(tmp_path):
    clip = counting_clip(frames=5)
    clip[1:3] = clip[1]
    back = read_video(write_video(clip, tmp_path / "clip.gif"))
    assert back.shape == clip.shape
    assert (back.int() - clip.int()).abs().max() <= 8  # 256-colour palette


def test_write_refuses_unknown_extension_and_odd_mp4_size(tmp_path):
    with pytest.raises(ValueError, match=r"\.mp4, \.webp, \.gif"):
        write_video(counting_clip(), tmp_path / "clip.avi")
    with pytest.raises(ValueError, match="even height and width.*31 x 48"):
        write_video(counting_clip(height=31), tmp_path / "odd.mp4")
    with pytest.raises(ValueError, match=r"\[F, H, W, 3\]"):
        write_video(torch.zeros(9, 32, 32), tmp_path / "gray.mp4")


def test_read_errors_name_the_file(tmp_path):
    corrupt = tmp_path / "corrupt.mp4"
    corrupt.write_bytes(b"not a video at all" * 50)
    with pytest.raises(VideoReadError, match="corrupt.mp4"):
        read_video(corrupt)
    with pytest.raises(VideoReadError, match="not found.*missing.mp4"):
        read_video(tmp_path / "missing.mp4")
    short = write_video(counting_clip(frames=5), tmp_path / "short.mp4")
    with pytest.raises(VideoReadError, match="short.mp4 is too short: it has 5 frames, 9 needed"):
        read_video(short, num_frames=9)
    assert issubclass(VideoReadError, ValueError)


def test_resize_center_crop_shapes_and_content():
    frames = torch.randint(0, 256, (2, 32, 64, 3), dtype=torch.uint8)
    # No scaling needed: a pure centre crop.
    assert torch.equal(resize_center_crop(frames, 32, 32), frames[:, :, 16:48])
    assert resize_center_crop(frames, 16, 48).shape == (2, 16, 48, 3)  # width decides: 64 -> 48, height 24 -> 16
    assert resize_center_crop(frames, 48, 48).shape == (2, 48, 48, 3)  # upscaling
    # Anti-aliased downscaling: a one-pixel checkerboard halves to flat grey, not to aliasing.
    checker = ((torch.arange(64)[:, None] + torch.arange(64)[None, :]) % 2 * 255).to(torch.uint8)
    small = resize_center_crop(checker[None, :, :, None].expand(1, 64, 64, 3).contiguous(), 16, 16)
    assert small.shape == (1, 16, 16, 3)
    assert (small.int() - 128).abs().max() <= 2


def test_resize_center_crop_refuses_float_frames():
    with pytest.raises(ValueError, match="uint8"):
        resize_center_crop(torch.rand(2, 8, 8, 3), 4, 4)


def test_float_and_uint8_inputs_write_the_same_video(tmp_path):
    clip = counting_clip(frames=3)
    a = read_video(write_video(clip, tmp_path / "a.webp"))
    b = read_video(write_video(clip.numpy().astype(np.float32) / 255, tmp_path / "b.webp"))
    assert torch.equal(a, b)


def test_the_same_frames_give_the_same_mp4(tmp_path):
    """Same seed, same file: x264's threads and assembly made files differ between encodes of one clip (up to
    6 variants in 40 encodes at 32 x 32, decoded frames up to 28/255 apart), most often after a decode."""
    frames = torch.rand(9, 32, 32, 3, generator=torch.Generator().manual_seed(0))
    files = set()
    for i in range(30):
        path = write_video(frames, tmp_path / f"{i}.mp4")
        files.add(path.read_bytes())
        read_video(path)
    assert len(files) == 1
