import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from se_ray.config import DataConfig
from se_ray.data import InputError, load_questions, stable_id
from tests.conftest import NQ_DEV, SVAMP

BROKEN = [
    '{"id": "a", "question": "who wrote hamlet", "answer": ["Shakespeare"]}',
    "this is not json",
    '{"id": "b"}',
    '{"id": "c", "question": "   "}',
    '{"id": "a", "question": "duplicate of the first id"}',
    '{"id": "d", "question": 42}',
    '{"id": "e", "question": "ok?", "references": [1, 2]}',
    '{"id": "f", "question": "ok?", "context": 3}',
    "[1, 2, 3]",
    '{"id": ["x"], "question": "list id"}',
    '{"question": "no id here", "references": ["x"]}',
    '{"id": 7, "question": "integer id", "references": "single"}',
]


def _write(tmp_path, lines, name="q.jsonl"):
    path = tmp_path / name
    path.write_text("\n".join(lines) + "\n")
    return path


def test_broken_rows_are_rejected_with_line_and_reason(tmp_path):
    path = _write(tmp_path, BROKEN)
    loaded = load_questions(str(path), DataConfig())
    assert [r["id"] for r in loaded.rows] == ["a", stable_id("no id here"), "7"]
    by_line = {r["line"]: r for r in loaded.rejects}
    assert set(by_line) == {2, 3, 4, 5, 6, 7, 8, 9, 10}
    assert "not valid JSON" in by_line[2]["reason"]
    assert by_line[3]["reason"] == "missing field 'question'" and by_line[3]["id"] == "b"
    assert by_line[4]["reason"] == "field 'question' is empty"
    assert by_line[5]["reason"] == "duplicate id 'a'" and by_line[5]["id"] == "a"
    assert "must be a string" in by_line[6]["reason"]
    assert "references" in by_line[7]["reason"]
    assert "context" in by_line[8]["reason"]
    assert "not an object" in by_line[9]["reason"]
    assert "id" in by_line[10]["reason"]
    assert all(r["source"] == str(path) for r in loaded.rejects)
    assert loaded.rows[2]["references"] == ["single"]


def test_stable_ids_are_deterministic_and_distinct():
    assert stable_id("q one") == stable_id("  q one ")
    assert stable_id("q one") != stable_id("q two")


def test_limit_counts_valid_rows_only(tmp_path):
    path = _write(tmp_path, BROKEN)
    loaded = load_questions(str(path), DataConfig(limit=2))
    assert [r["id"] for r in loaded.rows] == ["a", stable_id("no id here")]


def test_missing_input_is_an_input_error(tmp_path):
    with pytest.raises(InputError, match="does not exist"):
        load_questions(str(tmp_path / "nope.jsonl"), DataConfig())


def test_nq_open_adapter():
    if not NQ_DEV.exists():
        pytest.skip("shared data missing")
    loaded = load_questions(str(NQ_DEV), DataConfig(limit=5))
    first = json.loads(NQ_DEV.open().readline())
    assert loaded.rows[0]["question"] == first["question"]
    assert loaded.rows[0]["references"] == first["answer"]
    assert loaded.rows[0]["id"] == stable_id(first["question"])
    assert not loaded.rejects


def test_nq_open_full_file_has_unique_ids():
    if not NQ_DEV.exists():
        pytest.skip("shared data missing")
    loaded = load_questions(str(NQ_DEV), DataConfig())
    assert len(loaded.rows) + len(loaded.rejects) == 3610
    assert len({r["id"] for r in loaded.rows}) == len(loaded.rows)


def test_svamp_adapter():
    if not SVAMP.exists():
        pytest.skip("shared data missing")
    loaded = load_questions(str(SVAMP), DataConfig())
    assert len(loaded.rows) == 1000
    row = loaded.rows[0]
    assert row["id"] == "chal-1"
    assert row["question"].startswith("Each pack of dvds costs 76 dollars.")
    assert row["question"].endswith("How much do you have to pay to buy each pack?")
    assert row["references"] == ["51"]


def test_parquet_input(tmp_path):
    table = pa.Table.from_pylist(
        [
            {"id": "p1", "question": "q1", "references": ["r"]},
            {"id": "p2", "question": "", "references": None},
        ]
    )
    pq.write_table(table, tmp_path / "q.parquet")
    loaded = load_questions(str(tmp_path / "q.parquet"), DataConfig())
    assert [r["id"] for r in loaded.rows] == ["p1"]
    assert loaded.rejects[0]["id"] == "p2" and "empty" in loaded.rejects[0]["reason"]


def test_hf_dataset_from_disk(tmp_path):
    import datasets

    ds = datasets.Dataset.from_list(
        [{"question": "hf q", "answer": ["x"]}, {"question": "hf q2", "answer": ["y"]}]
    )
    ds.save_to_disk(str(tmp_path / "hf"))
    loaded = load_questions(str(tmp_path / "hf"), DataConfig(format="hf"))
    assert [r["question"] for r in loaded.rows] == ["hf q", "hf q2"]
    assert loaded.rows[1]["references"] == ["y"]


def test_loaded_rows_convert_to_the_question_schema(tmp_path):
    path = _write(tmp_path, BROKEN)
    table = load_questions(str(path), DataConfig()).to_arrow()
    assert table.column_names == ["id", "question", "references", "context"]
    assert table.num_rows == 3


def test_no_valid_question_is_one_line_pointing_at_the_rejects(tmp_path):
    from se_ray.data import require_questions

    path = _write(tmp_path, BROKEN[1:4])
    loaded = load_questions(str(path), DataConfig())
    with pytest.raises(InputError) as err:
        require_questions(loaded, "/out/rejects.jsonl")
    assert str(err.value) == (
        f"no valid question in {path}: 3 rows rejected, see /out/rejects.jsonl "
        "(line 1: not valid JSON: Expecting value: line 1 column 1 (char 0))"
    )
    empty = _write(tmp_path, [], name="empty.jsonl")
    with pytest.raises(InputError, match=f"^no valid question in {empty}: it holds no rows$"):
        require_questions(load_questions(str(empty), DataConfig()), "/out/rejects.jsonl")
    require_questions(load_questions(str(_write(tmp_path, BROKEN)), DataConfig()), "x")  # valid rows: fine


def test_label_columns_are_checked_by_name():
    from se_ray.data import require_label_columns

    require_label_columns(
        pa.schema([("id", pa.string()), ("question", pa.string()), ("target", pa.string())]), "t"
    )
    with pytest.raises(InputError) as err:
        require_label_columns(
            pa.schema([("id", pa.string()), ("answer", pa.string())]), "labels/part-0.parquet"
        )
    assert str(err.value) == (
        "labels labels/part-0.parquet lack columns question, target (it has id, answer); "
        "expected the labels/ folder `se-ray label` writes"
    )


def test_check_labels_folder(tmp_path):
    from se_ray.data import check_labels_folder

    good = pa.table({"id": ["q1"], "question": ["who?"], "target": ["me"], "tau": [1.0]})
    (tmp_path / "run" / "labels").mkdir(parents=True)
    pq.write_table(good, tmp_path / "run" / "labels" / "part-a.parquet")
    (tmp_path / "run" / "labels" / ".part-b.parquet.tmp").write_text("in flight")  # skipped
    assert len(check_labels_folder(str(tmp_path / "run"))[2]) == 1  # the run folder holding labels/
    assert len(check_labels_folder(str(tmp_path / "run" / "labels"))[2]) == 1
    pq.write_table(good.drop(["target"]), tmp_path / "run" / "labels" / "part-c.parquet")
    with pytest.raises(InputError, match=r"part-c.parquet lack column target \(it has id, question, tau\)"):
        check_labels_folder(str(tmp_path / "run"))
    (tmp_path / "run" / "labels" / "part-c.parquet").write_text("not parquet")
    with pytest.raises(InputError, match="part-c.parquet is not readable Parquet"):
        check_labels_folder(str(tmp_path / "run"))
    with pytest.raises(InputError, match="no committed Parquet parts"):
        check_labels_folder(str(tmp_path / "nothing"))
