"""Datasets: folder / CSV / JSONL listings, clip decoding, and bad videos skipped and counted, not fatal."""

import json

import pytest
import torch

from mimir.demo.world import make_dataset, render
from mimir.testing import tiny_train_components, write_world_clips
from mimir.train import TrainConfig, build_cache, train
from mimir.train.data import VideoDataset, read_clips
from mimir.video import write_video

pytestmark = pytest.mark.usefixtures("one_thread")
FIRST_CAPTION = make_dataset(1, seed=0)[0].caption  # clip000's: write_world_clips writes make_dataset(count, seed=0)


@pytest.fixture(scope="module")
def messy(tmp_path_factory):
    """3 good clips, a corrupt file, a 5-frame clip (9 needed), and a video without a caption."""
    folder = tmp_path_factory.mktemp("train_data") / "clips"
    write_world_clips(folder, count=3, frames=12, size=24)
    (folder / "corrupt.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42" + bytes(range(256)) * 4)
    (folder / "corrupt.txt").write_text("a broken video")
    spec = make_dataset(1, seed=1)[0]
    write_video(render(spec, 5, 16), folder / "short.mp4")
    (folder / "short.txt").write_text(spec.caption)
    write_video(render(spec, 9, 16), folder / "uncaptioned.mp4")
    return folder


def test_folder_csv_jsonl_listings(messy, tmp_path):
    clips, skipped = read_clips(messy)
    assert [c.video.name for c in clips] == ["clip000.mp4", "clip001.mp4", "clip002.mp4", "corrupt.mp4", "short.mp4"]
    assert clips[0].caption == FIRST_CAPTION
    assert list(skipped) == [str(messy / "uncaptioned.mp4")] and "no caption file" in skipped[str(messy / "uncaptioned.mp4")]
    (tmp_path / "list.csv").write_text(f"video,caption\n{messy}/clip000.mp4,\"a red square, moving\"\nclips/clip001.mp4,b\n")
    csv_clips, _ = read_clips(tmp_path / "list.csv")
    assert [(c.video, c.caption) for c in csv_clips] == [(messy / "clip000.mp4", "a red square, moving"),
                                                        (tmp_path / "clips" / "clip001.mp4", "b")]
    lines = [json.dumps({"video": "clips/clip002.mp4", "caption": "c"}), "{not json", json.dumps({"video": "x.mp4"})]
    (tmp_path / "list.jsonl").write_text("\n".join(lines) + "\n")
    jsonl_clips, jsonl_skipped = read_clips(tmp_path / "list.jsonl")
    assert [(c.video, c.caption) for c in jsonl_clips] == [(tmp_path / "clips" / "clip002.mp4", "c")]
    assert sorted(jsonl_skipped) == [f"{tmp_path / 'list.jsonl'}:2", f"{tmp_path / 'list.jsonl'}:3"]
    (tmp_path / "bad.csv").write_text("path,text\na.mp4,b\n")
    with pytest.raises(ValueError, match="needs the columns 'video' and 'caption'"):
        read_clips(tmp_path / "bad.csv")


def test_clip_decoding_stride_resize_and_skipping(messy):
    clips, _ = read_clips(messy)
    dataset = VideoDataset(clips, num_frames=5, height=16, width=16, stride=2)
    item = dataset[(0, 7)]
    assert item["pixels"].shape == (5, 16, 16, 3) and item["pixels"].dtype == torch.uint8
    assert item["position"] == 7 and item["caption"] == FIRST_CAPTION and not item["skipped"]
    strict = VideoDataset(clips, num_frames=9, height=16, width=16)
    item = strict[(3, 0)]  # corrupt.mp4, then short.mp4 (5 frames), then wraps round to clip000
    assert item["caption"] == FIRST_CAPTION
    assert set(item["skipped"]) == {str(messy / "corrupt.mp4"), str(messy / "short.mp4")}
    assert "too short" in item["skipped"][str(messy / "short.mp4")]


def test_bad_videos_are_skipped_and_counted(messy, tiny_run, tmp_path):
    common = dict(batch_size=4, **tiny_run)
    run = TrainConfig(data=str(messy), output_dir=str(tmp_path / "run"), max_steps=2, **common)
    summary = train(run, tiny_train_components(), progress=False)  # 8 samples: every clip is visited
    assert summary["skipped_videos"] == 3 and summary["final_loss"] > 0
    assert set(summary["skipped"]) == {str(messy / n) for n in ("corrupt.mp4", "short.mp4", "uncaptioned.mp4")}
    cached = TrainConfig(data=str(messy), cache=str(tmp_path / "cache"), output_dir=str(tmp_path / "cached_run"),
                         max_steps=1, **common)
    assert len(build_cache(cached, tiny_train_components(), progress=False)["skipped"]) == 3
    assert train(cached, tiny_train_components(), progress=False)["skipped_videos"] == 3
