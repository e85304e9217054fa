import pytest

import train


def test_help_lists_export_and_no_subcommand_that_cannot_run(capsys):
    with pytest.raises(SystemExit) as stop:
        train.main(["--help"])
    assert stop.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    assert "{fit,validate,test}" in text and "predict" not in text, text[:600]
    assert "export (`python train.py export --help`" in text, text[:600]


def test_predict_is_refused_in_one_line(capsys):
    with pytest.raises(SystemExit) as stop:
        train.main(["predict", "--config", "configs/demo4.yaml"])
    assert stop.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "invalid choice: 'predict'" in err[0], err
