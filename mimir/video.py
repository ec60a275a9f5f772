"""Video files in and out: the one place the project reads or writes them.

Frames are tensors `[F, H, W, 3]`: float in 0..1 or uint8 when written, always uint8 when read.
`.mp4` goes through PyAV (H.264, yuv420p); animated `.webp` and `.gif` go through Pillow, because FFmpeg's
WebP decoder does not read animated files.
"""

from __future__ import annotations

from pathlib import Path

import av
import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageSequence, UnidentifiedImageError

SUPPORTED_EXTENSIONS = (".mp4", ".webp", ".gif")
FRAME_MS_TAG = "mimir frame_ms="


class VideoReadError(ValueError):
    """A video file that is missing, unreadable, or too short for the frames asked for."""


def _to_uint8(frames) -> np.ndarray:
    """[F, H, W, 3] float 0..1 or uint8 (tensor or array) -> contiguous uint8 numpy array."""
    frames = torch.as_tensor(frames).detach().cpu()
    if frames.ndim != 4 or frames.shape[-1] != 3:
        raise ValueError(f"frames must have shape [F, H, W, 3], got {list(frames.shape)}")
    if frames.shape[0] == 0:
        raise ValueError("frames is empty: a video needs at least one frame")
    if frames.dtype != torch.uint8:
        frames = (frames.float().clamp(0, 1) * 255).round().to(torch.uint8)
    return np.ascontiguousarray(frames.numpy())


def _write_mp4(frames: np.ndarray, path: Path, fps: int, crf: int) -> None:
    height, width = frames.shape[1:3]
    if height % 2 or width % 2:
        raise ValueError(f"an .mp4 (yuv420p) needs an even height and width, got {height} x {width}: {path}")
    with av.open(str(path), mode="w") as container:
        stream = container.add_stream("libx264", rate=fps)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        # The same frames must give the same file. Measured (PyAV 18, 60 encodes of one clip at 32, 64 and 160 px):
        # x264's threads and its assembly each gave up to 6 different files; one thread without assembly gave
        # one, for ~2x the encode time (1.5 s for 49 frames at 720 x 480, small beside generating them).
        stream.options = {"crf": str(crf), "threads": "1", "x264-params": "asm=0"}
        for frame in frames:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        container.mux(stream.encode())  # flush the encoder


def _write_pillow(frames: np.ndarray, path: Path, fps: int) -> None:
    # Pillow (GIF) and libwebp (WebP) merge identical consecutive frames into one longer frame; the frame
    # duration written into the file's metadata lets read_video split them again.
    images = [Image.fromarray(frame) for frame in frames]
    frame_ms = max(1, round(1000 / fps))
    tag = f"{FRAME_MS_TAG}{frame_ms}".encode()
    extra = {"lossless": True, "xmp": tag} if path.suffix.lower() == ".webp" else {"disposal": 1, "comment": tag}
    images[0].save(path, save_all=True, append_images=images[1:], duration=frame_ms, loop=0, **extra)


def write_video(frames, path, fps: int = 8, crf: int = 18) -> Path:
    """Write frames [F, H, W, 3] (float 0..1 or uint8) to `.mp4`, `.webp` (lossless, animated) or `.gif`.

    crf is the H.264 quality for `.mp4` (lower is better; 18 is visually lossless). Returns the path.
    """
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in SUPPORTED_EXTENSIONS:
        raise ValueError(f"cannot write {path}: unknown extension {suffix!r}, supported: {', '.join(SUPPORTED_EXTENSIONS)}")
    if fps <= 0:
        raise ValueError(f"fps must be positive, got {fps}")
    frames = _to_uint8(frames)
    path.parent.mkdir(parents=True, exist_ok=True)
    if suffix == ".mp4":
        _write_mp4(frames, path, fps, crf)
    else:
        _write_pillow(frames, path, fps)
    return path


def _decode_pyav(path: Path, last: int | None):
    """Yield the decoded RGB frames of the first video stream, stopping after index `last`."""
    with av.open(str(path)) as container:
        if not container.streams.video:
            raise VideoReadError(f"{path} has no video stream")
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        for index, frame in enumerate(container.decode(stream)):
            yield frame.to_ndarray(format="rgb24")
            if last is not None and index >= last:
                return


def _decode_pillow(path: Path, last: int | None):
    """Yield the frames of an animated WebP/GIF, splitting frames the writer merged (see _write_pillow)."""
    with Image.open(path) as image:
        tag = (image.info.get("xmp") or image.info.get("comment") or b"").decode("latin-1")
        frames, durations = [], []
        for frame in ImageSequence.Iterator(image):
            frames.append(np.asarray(frame.convert("RGB")))  # converting loads the frame and its duration
            durations.append(frame.info.get("duration") or 0)
    frame_ms = int(tag[len(FRAME_MS_TAG):]) if tag.startswith(FRAME_MS_TAG) else min(durations) or 1
    index = 0
    for frame, duration in zip(frames, durations):
        for _ in range(max(1, round(duration / frame_ms))):
            yield frame
            if last is not None and index >= last:
                return
            index += 1


def read_video(path, num_frames: int | None = None, stride: int = 1, start: int = 0) -> torch.Tensor:
    """Read frames start, start + stride, ... (num_frames of them, or all to the end) as uint8 [F, H, W, 3].

    Raises VideoReadError (a ValueError) naming the file when it is missing, cannot be decoded, or has fewer
    frames than asked for.
    """
    path = Path(path)
    if stride < 1 or start < 0 or (num_frames is not None and num_frames < 1):
        raise ValueError(f"need stride >= 1, start >= 0, num_frames >= 1 or None; got {stride}, {start}, {num_frames}")
    if not path.is_file():
        raise VideoReadError(f"video file not found: {path}")
    last = None if num_frames is None else start + (num_frames - 1) * stride
    decode = _decode_pillow if path.suffix.lower() in (".webp", ".gif") else _decode_pyav
    try:
        decoded = list(decode(path, last))
    except (av.FFmpegError, UnidentifiedImageError, OSError) as error:
        raise VideoReadError(f"cannot decode video {path}: {error}") from error
    wanted = decoded[start::stride] if num_frames is None else decoded[start:last + 1:stride]
    if not wanted or (num_frames is not None and len(wanted) < num_frames):
        needed = start + 1 if last is None else last + 1
        raise VideoReadError(f"video {path} is too short: it has {len(decoded)} frames, "
                             f"{needed} needed (start {start}, stride {stride}, num_frames {num_frames})")
    return torch.from_numpy(np.stack(wanted))


def resize_center_crop(frames: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Resize uint8 [F, H, W, 3] so it covers height x width (short side fits), then crop the centre."""
    if frames.dtype != torch.uint8 or frames.ndim != 4 or frames.shape[-1] != 3:
        raise ValueError(f"frames must be uint8 [F, H, W, 3], got {frames.dtype} {list(frames.shape)}")
    if height < 1 or width < 1:
        raise ValueError(f"target size must be positive, got {height} x {width}")
    in_h, in_w = frames.shape[1:3]
    scale = max(height / in_h, width / in_w)
    new_h, new_w = max(height, round(in_h * scale)), max(width, round(in_w * scale))
    if (new_h, new_w) != (in_h, in_w):
        x = frames.permute(0, 3, 1, 2).float()
        x = F.interpolate(x, size=(new_h, new_w), mode="bilinear", antialias=True, align_corners=False)
        frames = x.round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1)
    top, left = (new_h - height) // 2, (new_w - width) // 2
    return frames[:, top:top + height, left:left + width].contiguous()
