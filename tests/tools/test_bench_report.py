from tools.bench_report import machine_description, write_section


def test_sections_are_replaced_in_place_and_others_kept(tmp_path):
    out = tmp_path / "BENCHMARKS.md"
    write_section(out, "a", "A", "m1", "first a")
    write_section(out, "b", "B", "m1", "only b")
    write_section(out, "a", "A", "m2", "second a")
    text = out.read_text()
    assert "second a" in text and "first a" not in text
    assert "only b" in text
    assert text.index("second a") < text.index("only b")  # replaced where it stood
    assert text.count("<!-- a:start -->") == 1


def test_machine_description_names_cores_and_torch():
    d = machine_description()
    assert "cores" in d and "torch" in d
