"""Readers, writers, the chat formats (round trips) and tables -> records."""

from __future__ import annotations

import json

import pytest

from vlmkit.data import files
from vlmkit.data.convert import convert, open_records
from vlmkit.data.files import RecordWriter, read_rows
from vlmkit.data.formats import FORMATS, encode_llava
from vlmkit.data.records import DataError, Record, Turn
from vlmkit.data.tables import TableMapping

from .conftest import DATA

LLAVA = [
    {"id": "000000033471", "image": "coco/train2017/000000033471.jpg",
     "conversations": [{"from": "human", "value": "<image>\nWhat are the colors of the bus?"},
                       {"from": "gpt", "value": "The bus is white and red."},
                       {"from": "human", "value": "What feature can be seen on the back of the bus?"},
                       {"from": "gpt", "value": "An advertisement."}]},
    {"id": "gqa-1", "image": "gqa/1.jpg", "source": "gqa",
     "conversations": [{"from": "human", "value": "图中有什么？\n<image>"}, {"from": "gpt", "value": "一只猫。"}]},
    {"id": "text-only", "conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello"}]},
]


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


# ------------------------------------------------------------------------------ round trips
@pytest.mark.parametrize("via", ["sharegpt", "messages", "openai", "llava"])
def test_round_trip_through_each_format(tmp_path, via):
    source = write_jsonl(tmp_path / "source.jsonl", LLAVA)
    convert(source, tmp_path / f"{via}.jsonl", to=via)
    convert(tmp_path / f"{via}.jsonl", tmp_path / "back.json", to="llava")
    assert json.loads((tmp_path / "back.json").read_text(encoding="utf-8")) == LLAVA


def test_formats_as_other_tools_write_them(tmp_path):
    source = write_jsonl(tmp_path / "llava.jsonl", LLAVA[:2])
    for fmt in ("sharegpt", "messages", "openai"):
        convert(source, tmp_path / f"{fmt}.jsonl", to=fmt)
    sharegpt = json.loads((tmp_path / "sharegpt.jsonl").read_text().splitlines()[0])
    assert sharegpt["images"] == ["coco/train2017/000000033471.jpg"]
    assert sharegpt["conversations"][0] == {"from": "human", "value": "<image>\nWhat are the colors of the bus?"}
    messages = json.loads((tmp_path / "messages.jsonl").read_text().splitlines()[1])
    assert messages["messages"][0] == {"role": "user", "content": "图中有什么？\n<image>"}
    assert messages["images"] == ["gqa/1.jpg"] and messages["source"] == "gqa"
    openai = json.loads((tmp_path / "openai.jsonl").read_text().splitlines()[0])
    assert openai["messages"][0]["content"] == [
        {"type": "image_url", "image_url": {"url": "coco/train2017/000000033471.jpg"}},
        {"type": "text", "text": "What are the colors of the bus?"}]
    assert openai["messages"][1] == {"role": "assistant", "content": "The bus is white and red."}


def test_messages_with_system_and_parts(tmp_path):
    rows = [{"messages": [{"role": "system", "content": "You describe photos."},
                          {"role": "user", "content": [{"type": "text", "text": "Compare"},
                                                       {"type": "image", "image": "a.png"},
                                                       {"type": "image_url", "image_url": {"url": "b.png"}}]},
                          {"role": "assistant", "content": "Both are cats."}]}]
    stream = open_records(write_jsonl(tmp_path / "m.jsonl", rows))
    rec = next(iter(stream))
    assert stream.format == "messages"
    assert rec.system == "You describe photos." and rec.images == ["a.png", "b.png"]
    assert rec.turns[0].text == "Compare\n<image>\n<image>" and rec.id == "000000000"
    out = encode_llava(rec)
    assert out["image"] == ["a.png", "b.png"] and out["system"] == "You describe photos."


def test_sharegpt_system_turn_and_role_spellings(tmp_path):
    rows = [{"conversations": [{"from": "system", "value": "Be brief."}, {"from": "user", "value": "<image>Hi"},
                               {"from": "assistant", "value": "Hello"}], "images": ["x.png"]}]
    stream = open_records(write_jsonl(tmp_path / "s.jsonl", rows))
    rec = next(iter(stream))
    assert stream.format == "sharegpt"
    assert rec.system == "Be brief." and [t.role for t in rec.turns] == ["user", "assistant"]


def test_unknown_role_is_kept_for_check(tmp_path):
    rows = [{"conversations": [{"from": "narrator", "value": "x"}, {"from": "gpt", "value": "y"}]}]
    rec = next(iter(open_records(write_jsonl(tmp_path / "s.jsonl", rows))))
    assert rec.turns[0].role == "narrator"


def test_mixed_formats_in_one_file_are_refused(tmp_path):
    source = write_jsonl(tmp_path / "x.jsonl", [LLAVA[0], {"messages": []}])
    with pytest.raises(DataError, match=r"x.jsonl:2: no 'conversations' field"):
        list(open_records(source))


# ------------------------------------------------------------------------------ readers
def test_json_array_is_parsed_element_by_element(tmp_path, monkeypatch):
    monkeypatch.setattr(files, "CHUNK", 7)  # elements straddle many buffer refills
    rows = [{"id": str(i), "text": "猫" * i, "nested": {"a": [i, {"b": "]}"}]}} for i in range(50)]
    path = tmp_path / "a.json"
    path.write_text(json.dumps(rows, ensure_ascii=False, indent=2), encoding="utf-8")
    got = list(read_rows(path))
    assert [r for _, r in got] == rows and got[3][0] == "a.json:#3"


@pytest.mark.parametrize("text,match", [
    ('{"id": 1}', "expected a JSON array"),
    ('[{"id": 1}, {"id": ', "element #1 is not valid JSON"),
    ('[{"id": 1}, 3]', "element #1 is a int"),
])
def test_json_array_errors_name_the_element(tmp_path, text, match):
    path = tmp_path / "bad.json"
    path.write_text(text)
    with pytest.raises(DataError, match=match):
        list(read_rows(path))


def test_csv_with_bom_tsv_and_bad_rows(tmp_path):
    (tmp_path / "a.csv").write_text("\ufeffdir,text\na.png,\"一只猫, 很可爱\"\n", encoding="utf-8")
    assert list(read_rows(tmp_path / "a.csv")) == [("a.csv:2", {"dir": "a.png", "text": "一只猫, 很可爱"})]
    (tmp_path / "a.tsv").write_text("url\tcaption\nhttp://x/1.jpg\ta b\n")
    assert next(read_rows(tmp_path / "a.tsv"))[1] == {"url": "http://x/1.jpg", "caption": "a b"}
    (tmp_path / "b.csv").write_text("dir,text\na.png,x,y\n")
    with pytest.raises(DataError, match=r"b.csv:2: 3 fields where the header has 2"):
        list(read_rows(tmp_path / "b.csv"))
    with pytest.raises(DataError, match="unknown data file type"):
        list(read_rows(tmp_path / "a.xlsx"))


def test_parquet_rows(tmp_path):
    pq = pytest.importorskip("pyarrow.parquet", reason="Parquet needs pyarrow (pip install pyarrow)")
    import pyarrow as pa

    table = pa.table({"url": [f"http://h/{i}.jpg" for i in range(2500)], "caption": ["图"] * 2500})
    pq.write_table(table, tmp_path / "t.parquet", row_group_size=1000)
    rows = list(read_rows(tmp_path / "t.parquet"))
    assert len(rows) == 2500 and rows[2499] == ("t.parquet:#2499", {"url": "http://h/2499.jpg", "caption": "图"})


# ------------------------------------------------------------------------------ writer
def test_writer_is_atomic_and_refuses_to_overwrite(tmp_path):
    out = tmp_path / "out.jsonl"
    with pytest.raises(RuntimeError):
        with RecordWriter(out) as w:
            w.write({"a": 1})
            raise RuntimeError("boom")
    assert not out.exists() and not list(tmp_path.iterdir())
    with RecordWriter(out) as w:
        w.write({"text": "猫"})
    assert out.read_text(encoding="utf-8") == '{"text": "猫"}\n'  # ensure_ascii=False
    with pytest.raises(DataError, match="already exists"):
        RecordWriter(out)
    with pytest.raises(DataError, match="is the input"):
        RecordWriter(out, force=True, sources=(out,))
    with pytest.raises(DataError, match=r"\.jsonl or \.json"):
        RecordWriter(tmp_path / "out.csv")


def test_json_array_output_is_valid_json(tmp_path):
    source = write_jsonl(tmp_path / "x.jsonl", LLAVA)
    convert(source, tmp_path / "x.json")
    assert len(json.loads((tmp_path / "x.json").read_text())) == 3
    convert(write_jsonl(tmp_path / "empty.jsonl", []), tmp_path / "empty.json")
    assert json.loads((tmp_path / "empty.json").read_text()) == []


# ------------------------------------------------------------------------------ tables
def test_wukong_table_as_the_handbook_builds_it(tmp_path):
    mapping = TableMapping(image_column="dir", text_column="text", prompts=("为该图片生成标注。",))
    convert(DATA / "wukong_tiny.csv", tmp_path / "w.json", mapping=mapping)
    text = (tmp_path / "w.json").read_text(encoding="utf-8")
    assert "为该图片生成标注" in text and "\\u" not in text
    first = json.loads(text)[0]
    assert first == {"id": "000000000", "image": "chelsea.png",
                     "conversations": [{"from": "human", "value": "<image>\n为该图片生成标注。"},
                                       {"from": "gpt", "value": "一只橘色的虎斑猫趴在地上，看着镜头。"}]}


def test_table_columns_are_guessed_or_named(tmp_path):
    (tmp_path / "t.csv").write_text("url,caption,key\nhttp://h/a.jpg,a,k1\n")
    rec = next(iter(open_records(tmp_path / "t.csv", mapping=TableMapping(prompts=("Describe.",)))))
    assert rec.images == ["http://h/a.jpg"] and rec.turns[1].text == "a"
    with pytest.raises(DataError, match=r"no column nope; the columns are url, caption, key"):
        open_records(tmp_path / "t.csv", mapping=TableMapping(text_column="nope", prompts=("D.",)))
    with pytest.raises(DataError, match="is a table"):
        open_records(tmp_path / "t.csv")
    with pytest.raises(DataError, match="--prompt"):
        TableMapping()


def test_prompt_choice_is_reproducible_with_the_seed(tmp_path):
    rows = "".join(f"img{i}.jpg,caption {i}\n" for i in range(200))
    (tmp_path / "t.csv").write_text("image,text\n" + rows)
    prompts = ("Describe the image briefly.", "Summarize the photo.", "What is in the picture?")

    def texts(seed):
        mapping = TableMapping(prompts=prompts, placement="random", seed=seed)
        return [r.turns[0].text for r in open_records(tmp_path / "t.csv", mapping=mapping)]

    first = texts(1)
    assert texts(1) == first and texts(2) != first
    assert {t.replace("<image>", "").strip() for t in first} == set(prompts)
    assert any(t.startswith("<image>\n") for t in first) and any(t.endswith("\n<image>") for t in first)


def test_image_template_ids_and_kept_columns(tmp_path):
    (tmp_path / "t.csv").write_text("shard,name,text,lang\n00012,cat.jpg,猫,zh\n")
    mapping = TableMapping(text_column="text", image_template="wukong/{shard}/{name}", id_from_file=True,
                           prompts=("<image>\n这是什么？",), keep_columns=("lang",))
    rec = next(iter(open_records(tmp_path / "t.csv", mapping=mapping)))
    assert rec.images == ["wukong/00012/cat.jpg"] and rec.id == "cat" and rec.extra == {"lang": "zh"}
    assert rec.turns[0].text == "<image>\n这是什么？"  # a prompt holding <image> is used as is
    absolute = TableMapping(image_column="name", text_column="text", prompts=("D",), image_folder=tmp_path)
    (tmp_path / "u.csv").write_text(f"name,text\n{tmp_path}/sub/a.png,x\n")
    assert next(iter(open_records(tmp_path / "u.csv", mapping=absolute))).images == ["sub/a.png"]
    by_column = TableMapping(image_column="name", text_column="text", id_column="shard", prompts=("D",))
    assert next(iter(open_records(tmp_path / "t.csv", mapping=by_column))).id == "00012"


def test_every_format_is_registered():
    assert set(FORMATS) == {"llava", "sharegpt", "messages", "openai"}
    rec = Record("1", [], [Turn("user", "a"), Turn("assistant", "b")])
    for fmt in FORMATS.values():
        assert fmt.decode("x", fmt.encode(rec), 0).turns == rec.turns


def test_convert_memory_does_not_grow_with_rows(tmp_path):
    # Streaming: the Python heap's peak while converting 10,000 rows is that of 1,000 rows (a few KiB apart),
    # where a list of records would grow tenfold.
    import tracemalloc

    mapping = TableMapping(image_column="dir", text_column="text", prompts=("为该图片生成标注。",))
    peaks = []
    for rows in (1_000, 10_000):
        source = tmp_path / f"w{rows}.csv"
        source.write_text("dir,text\n" + "".join(f"{i:08d}.jpg,一只猫在草地上{i}\n" for i in range(rows)),
                          encoding="utf-8")
        tracemalloc.start()
        convert(source, tmp_path / f"w{rows}.jsonl", mapping=mapping)
        peaks.append(tracemalloc.get_traced_memory()[1])
        tracemalloc.stop()
    assert peaks[1] < peaks[0] * 1.1 + 64 * 1024, peaks
