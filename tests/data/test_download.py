"""`vlmkit data download` against a local HTTP server (127.0.0.1 only): photos, a failing URL, resuming."""

from __future__ import annotations

import functools
import http.server
import importlib.util
import json
import shutil
import threading

import pytest
from PIL import Image

from .conftest import IMAGES

pytest.importorskip("img2dataset", reason="vlmkit data download needs img2dataset (pip install img2dataset)")


class _Handler(http.server.SimpleHTTPRequestHandler):
    hits: list[str] = []

    def do_GET(self):  # noqa: N802 - http.server's name
        type(self).hits.append(self.path)
        super().do_GET()

    def log_message(self, *args):
        pass


@pytest.fixture
def server(tmp_path):
    root = tmp_path / "www"
    root.mkdir()
    for name in ("chelsea.png", "coffee.png"):
        shutil.copyfile(IMAGES / name, root / name)
    handler = type("Handler", (_Handler,), {"hits": []})
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(handler, directory=str(root)))
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}", handler
    httpd.shutdown()
    httpd.server_close()


# img2dataset runs its downloader and its logger in spawned processes that import img2dataset (and with it
# albumentations, OpenCV, pandas, pyarrow, wandb) afresh: about 25 s per run on two cores, twice here.
@pytest.mark.slow
def test_download_writes_images_records_and_failures(tmp_path, server, vlmkit_data):
    base, handler = server
    urls = tmp_path / "urls.csv"
    urls.write_text("url,caption,uid\n"
                    f"{base}/chelsea.png,一只猫。,cat-1\n"
                    f"{base}/missing.png,不存在。,gone-2\n"
                    f"{base}/coffee.png,一杯咖啡。,coffee-3\n", encoding="utf-8")
    out = tmp_path / "images"
    args = ["download", urls, "--out", out, "--id-column", "uid", "--prompt", "为该图片生成标注。",
            "--image-size", 64, "--threads", 2, "--timeout", 5, "--quiet"]
    result = vlmkit_data(*args)
    assert result.code == 0, result.err
    assert "2 image(s) downloaded, 1 failed" in result.out

    records = [json.loads(line) for line in (out / "records.jsonl").read_text(encoding="utf-8").splitlines()]
    assert sorted(r["id"] for r in records) == ["cat-1", "coffee-3"]
    cat = next(r for r in records if r["id"] == "cat-1")
    assert cat["conversations"] == [{"from": "human", "value": "<image>\n为该图片生成标注。"},
                                    {"from": "gpt", "value": "一只猫。"}]
    with Image.open(out / cat["image"]) as im:  # resized as asked ("border": padded to a square)
        assert im.size == (64, 64)
    failed = [json.loads(line) for line in (out / "failed.jsonl").read_text().splitlines()]
    assert len(failed) == 1 and failed[0]["url"] == f"{base}/missing.png" and failed[0]["id"] == "gone-2"
    assert "404" in failed[0]["error"]
    checked = vlmkit_data("check", out / "records.jsonl", "--image-folder", out)
    assert checked.code == 0, checked.out

    # a second run resumes: finished shards are not fetched again, the records are the same
    fetched = len(handler.hits)
    again = vlmkit_data(*args)
    assert again.code == 0, again.err
    assert len(handler.hits) == fetched
    assert [json.loads(line) for line in (out / "records.jsonl").read_text().splitlines()] == records


def test_download_refuses_a_list_without_the_columns(tmp_path, vlmkit_data):
    urls = tmp_path / "urls.csv"
    urls.write_text("URL,TEXT\nhttp://127.0.0.1:9/a.png,a\n")
    result = vlmkit_data("download", urls, "--out", tmp_path / "o", "--prompt", "Describe.")
    assert result.code == 1 and "no column url, caption; the columns are URL, TEXT" in result.err
    assert not (tmp_path / "o").exists()


# img2dataset's shards as Ray tasks on a local cluster; Ray's start and img2dataset's imports: about a minute
@pytest.mark.xdist_group("ray")  # one Ray at a time on a 2-core machine (tests/engines/test_ray.py)
@pytest.mark.slow
def test_download_on_ray(tmp_path, server, vlmkit_data, local_ray):
    base, handler = server
    urls = tmp_path / "urls.csv"
    urls.write_text(f"url,caption\n{base}/chelsea.png,一只猫。\n{base}/coffee.png,一杯咖啡。\n", encoding="utf-8")
    out = tmp_path / "images"
    result = vlmkit_data("download", urls, "--out", out, "--prompt", "为该图片生成标注。", "--image-size", 32,
                         "--threads", 2, "--timeout", 5, "--quiet", "--distributor", "ray")
    assert result.code == 0, result.err
    assert "2 image(s) downloaded, 0 failed" in result.out
    assert sorted(handler.hits) == ["/chelsea.png", "/coffee.png"]
    records = [json.loads(line) for line in (out / "records.jsonl").read_text(encoding="utf-8").splitlines()]
    assert sorted(r["conversations"][1]["value"] for r in records) == ["一只猫。", "一杯咖啡。"]
    for r in records:
        with Image.open(out / r["image"]) as im:
            assert im.size == (32, 32)


@pytest.mark.skipif(importlib.util.find_spec("pyspark") is not None, reason="pyspark is installed here")
def test_download_names_the_missing_distributor(tmp_path, vlmkit_data):
    urls = tmp_path / "urls.csv"
    urls.write_text("url,caption\nhttp://127.0.0.1:9/a.png,a\n")
    result = vlmkit_data("download", urls, "--out", tmp_path / "o", "--prompt", "Describe.", "--distributor", "pyspark")
    assert result.code == 1 and "--distributor pyspark needs pyspark, which is not installed" in result.err
    assert "pip install pyspark" in result.err and not (tmp_path / "o").exists()
