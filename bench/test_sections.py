"""RESULTS.md sections owned by one script survive the others' rewrites."""

import sections


def test_a_section_is_replaced_in_place_and_report_keeps_every_owned_one(tmp_path):
    path = tmp_path / "RESULTS.md"
    path.write_text("# report\n")
    sections.write_section(path, sections.HOST_OVERHEAD, "Host", "old host table")
    sections.write_section(path, sections.CHEAP_STEPS, "Cheap", "cheap table")
    sections.write_section(path, sections.HOST_OVERHEAD, "Host", "new host table")
    text = path.read_text()
    assert text.startswith("# report\n") and "old host table" not in text and text.count("new host table") == 1
    kept = sections.kept_sections(text)
    assert len(kept) == 2 and "new host table" in kept[0] and "cheap table" in kept[1]
