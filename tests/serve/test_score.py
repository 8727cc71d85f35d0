"""``vlmkit serve`` on a BLIP-2 retrieval model: ``POST /v1/score`` (image x texts -> ITM and ITC), under the server's
limits, and the chat route refusing with the way to the scoring one."""

from __future__ import annotations

import base64
import io
import json

import httpx2 as httpx
import pytest
import torch
from PIL import Image

from vlmkit import api
from vlmkit.families.blip2_retrieval import tiny
from vlmkit.serve import protocol

from ..conftest import run_cli
from .conftest import PHOTOS, Server

CAT = PHOTOS / "chelsea.png"
TEXTS = ["a cat sitting on a red sofa", "a rocket at the launch pad at night", "two dogs"]


@pytest.fixture(scope="module")
def retrieval(tmp_path_factory):
    """LAVIS's blip2_pretrained.pth (tiny, the ViT given apart as eva_vit_g.pth) and its conversion."""
    root = tmp_path_factory.mktemp("blip2-retrieval-serve")
    vocab = tiny.make_tokenizer(root / "bert-base-uncased")
    heads = root / "tiny-heads.json"
    heads.write_text(json.dumps(tiny.TinySizes().override()))
    eva = tiny.make_eva_vit(root / "eva" / "eva_vit_g.pth")
    lavis = tiny.make_pretrained(root / "lavis" / "blip2_pretrained.pth", vocab)
    bert = root / "bert-base-uncased"
    converted = root / "blip2-itm-tiny"
    result = run_cli("convert", lavis, converted, "--quiet", "--vision", eva, "--language-model", bert,
                     "--config", heads)
    assert result.code == 0, result.err
    media = root / "media"
    media.mkdir()
    (media / "cat.png").write_bytes(CAT.read_bytes())
    return {"lavis": lavis, "eva": eva, "bert": bert, "config": heads, "converted": converted, "media": media}


@pytest.fixture(scope="module")
def server(retrieval):
    s = Server(retrieval["converted"], "--max-body-size", "1MB", "--max-image-pixels", "1000000",
               "--allowed-local-media-path", retrieval["media"])
    yield s
    s.stop()


def data_url(raw: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(raw).decode()


def post_score(server, body) -> httpx.Response:
    return httpx.post(server.url + "/v1/score", json=body, timeout=60)


def transformers_alone(folder, image, texts) -> list[tuple[float, float]]:
    """transformers' own usage (its docstring's), one text at a time: an independent recomputation."""
    from transformers import AutoProcessor, Blip2ForImageTextRetrieval

    model = Blip2ForImageTextRetrieval.from_pretrained(folder).eval()
    processor = AutoProcessor.from_pretrained(folder)
    out = []
    with torch.no_grad():
        for text in texts:
            inputs = processor(images=image, text=text, return_tensors="pt")
            itm = model(**inputs, use_image_text_matching_head=True).logits_per_image.softmax(dim=1)[0, 1]
            itc = model(**inputs, use_image_text_matching_head=False).logits_per_image[0, 0]
            out.append((float(itm), float(itc)))
    return out


def test_score_endpoint_gives_api_score_s_numbers(server, retrieval):
    response = post_score(server, {"model": "tiny-llava", "image_url": {"url": data_url(CAT.read_bytes())},
                                   "texts": TEXTS})
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["object"] == "list" and body["model"] == "tiny-llava"
    rows = body["data"]
    assert [(r["index"], r["text"]) for r in rows] == list(enumerate(TEXTS))
    same = api.score(CAT, TEXTS, retrieval["converted"])
    lavis = api.score(CAT, TEXTS, retrieval["lavis"], vision_tower=str(retrieval["eva"]),
                      model_base=str(retrieval["bert"]), config=tiny.TinySizes().override())
    alone = transformers_alone(retrieval["converted"], Image.open(CAT).convert("RGB"), TEXTS)
    for row, mine, original, (itm, itc) in zip(rows, same, lavis, alone):
        assert (row["itm"], row["itc"]) == (mine["itm"], mine["itc"])  # the same model, the same batch
        for value, key in ((itm, "itm"), (itc, "itc")):
            assert abs(row[key] - value) <= 1e-4 and abs(row[key] - original[key]) <= 1e-4, (row, value, original)
    assert len({round(r["itm"], 4) for r in rows}) == len(TEXTS)  # the texts are told apart
    cat = post_score(server, {"image_url": {"url": (retrieval["media"] / "cat.png").as_uri()}, "texts": TEXTS[:1]})
    assert cat.status_code == 200, cat.text
    assert abs(cat.json()["data"][0]["itm"] - rows[0]["itm"]) <= 1e-6  # one text alone: a batch of one


def test_the_lavis_checkpoint_itself_is_served_with_lavis_s_numbers(retrieval):
    """The original form (blip2_pretrained.pth + its parts, as `vlmkit score` takes them) runs LAVIS's forward."""
    flags = ["--vision", retrieval["eva"], "--language-model", retrieval["bert"], "--config", retrieval["config"]]
    server = Server(retrieval["lavis"], *flags)
    try:
        response = post_score(server, {"image_url": {"url": data_url(CAT.read_bytes())}, "texts": TEXTS})
    finally:
        server.stop()
    assert response.status_code == 200, response.text
    expected = json.loads(run_cli("score", CAT, *TEXTS, retrieval["lavis"], "--json", *flags).out)
    assert [(r["text"], r["itm"], r["itc"]) for r in response.json()["data"]] == \
        [(r["text"], r["itm"], r["itc"]) for r in expected]


def _png(width: int, height: int) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (width, height), (200, 10, 10)).save(out, format="PNG")
    return out.getvalue()


CAT_URL = {"url": data_url(CAT.read_bytes())}
BAD = [
    ("no texts", {"image_url": CAT_URL, "texts": []}, 400, "texts", "at least 1"),
    ("too many texts", {"image_url": CAT_URL, "texts": ["a cat"] * (protocol.MAX_SCORE_TEXTS + 1)}, 400, "texts",
     f"at most {protocol.MAX_SCORE_TEXTS}"),
    ("a text too long", {"image_url": CAT_URL, "texts": ["a cat", "x" * (protocol.MAX_SCORE_TEXT_CHARS + 1)]}, 400,
     "texts.1", f"at most {protocol.MAX_SCORE_TEXT_CHARS} characters"),
    ("a text not a string", {"image_url": CAT_URL, "texts": ["a cat", 3]}, 400, "texts.1", "valid string"),
    ("no image", {"texts": ["a cat"]}, 400, "image_url", "field required"),
    ("a broken image", {"image_url": {"url": data_url(CAT.read_bytes()[:4000])}, "texts": ["a cat"]}, 400,
     "image_url", "truncated"),
    ("above the pixel limit", {"image_url": {"url": data_url(_png(1200, 1200))}, "texts": ["a cat"]}, 400,
     "image_url", "pixel"),
    ("file:// outside the allowed folder", {"image_url": {"url": "file:///etc/passwd"}, "texts": ["a cat"]}, 400,
     "image_url", "only allowed under"),
    ("http from a domain not allowed", {"image_url": {"url": "http://127.0.0.1:9/cat.png"}, "texts": ["a"]}, 400,
     "image_url", "refused"),
    ("a model this server does not serve", {"model": "gpt-4o", "image_url": CAT_URL, "texts": ["a cat"]}, 404,
     "model", "'gpt-4o' does not exist"),
    ("body above --max-body-size", {"image_url": CAT_URL, "texts": ["x" * 1000] * 1100}, 413, None, "larger than"),
]


@pytest.mark.parametrize("name, body, status, param, words", BAD, ids=[b[0] for b in BAD])
def test_bad_score_requests_get_a_clear_4xx(server, name, body, status, param, words):
    response = post_score(server, body)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert words.lower() in error["message"].lower() and error["param"] == param, error


def test_chat_on_a_scoring_model_says_where_to_go_and_the_schema_has_the_route(server):
    chat = httpx.post(server.url + "/v1/chat/completions", timeout=30,
                      json={"messages": [{"role": "user", "content": "hi"}]})
    assert chat.status_code == 400, chat.text
    error = chat.json()["error"]
    assert error["code"] == "scoring_model" and "scoring model" in error["message"], error
    assert "POST /v1/score" in error["message"], error
    assert httpx.get(server.url + "/health").json()["status"] == "ok"
    schema = httpx.get(server.url + "/openapi.json").json()
    request = schema["components"]["schemas"]["ScoreRequest"]["properties"]
    assert "post" in schema["paths"]["/v1/score"] and {"image_url", "texts"} <= set(request)
    assert request["texts"]["maxItems"] == protocol.MAX_SCORE_TEXTS
