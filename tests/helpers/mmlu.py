"""A small MMLU folder (dev/ and test/ CSVs), written as the real data set lays it out."""

from __future__ import annotations

TEST_ROWS = {
    # The stub answers with the colour's letter: 3 of 4 right here ...
    "astronomy": [
        '"Which planet looks red?",Mars,Venus,Earth,Jupiter,A',
        '"On a clear day, is the sky blue?",No,Yes,Never,Maybe,B',
        '"Is grass green?",No,Sometimes,Yes,Never,C',
        '"Does the sun look yellow?",Yes,No,Never,Maybe,A',
    ],
    # ... and 1 of 2 here: 4 of 6 overall.
    "high_school_physics": [
        '"Is a red laser visible?",Yes,No,Never,Maybe,A',
        '"Is a blue flame hot?",No,Maybe,Never,Yes,D',
    ],
}


DEV_ROWS = {
    "astronomy": ['"Is Mars red?",Yes,No,Never,Maybe,A', '"Is the Moon a star?",Yes,No,Never,Maybe,B'],
    "high_school_physics": [
        '"Is ice cold?",Yes,No,Never,Maybe,A',
        '"Is a green apple ripe?",Yes,No,Maybe,Often,C',
    ],
}


def write_mmlu(root, test_rows=TEST_ROWS, dev_rows=DEV_ROWS):
    for split, rows in (("test", test_rows), ("dev", dev_rows)):
        (root / split).mkdir(parents=True, exist_ok=True)
        for subject, lines in rows.items():
            (root / split / f"{subject}_{split}.csv").write_text("\n".join(lines) + "\n")
    return root
