import io

import lightning.pytorch as pl
import pytest
import torch

from divmerge.lightning.progress import PlainProgress
from divmerge.zoo import demo


class _Regression(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.w = torch.nn.Parameter(torch.ones(1))

    def training_step(self, batch: torch.Tensor, batch_idx: int) -> torch.Tensor:
        loss = ((self.w * batch - 2 * batch) ** 2).mean()
        self.log("train/loss", loss)
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_an_epoch_without_validation_gets_its_plain_line(capsys):
    loader = torch.utils.data.DataLoader(torch.ones(6, 1), batch_size=2)
    trainer = pl.Trainer(
        max_epochs=2,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[PlainProgress(every_s=1e9, label="expert 'x'")],
    )
    trainer.fit(_Regression(), train_dataloaders=loader)
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("divmerge:")]
    assert len(lines) == 2, lines
    assert lines[0].startswith("divmerge: expert 'x' | step 3/6 | epoch 1/2 | loss "), lines
    assert lines[1].startswith("divmerge: expert 'x' | step 6/6 | epoch 2/2 | loss "), lines
    assert all(" steps/s | ETA " in line for line in lines), lines
    assert lines[1].endswith("ETA 0s"), lines


def test_expert_building_prints_plain_lines_into_a_file(monkeypatch):
    seen = {}

    class StopError(Exception):
        pass

    def fake_trainer(**kwargs: object) -> None:
        seen.update(kwargs)
        raise StopError

    monkeypatch.setattr(pl, "Trainer", fake_trainer)
    monkeypatch.setattr("sys.stdout", io.StringIO())  # a log file, not a terminal
    recipe = demo.ExpertRecipe(num_train=8)
    with pytest.raises(StopError):
        demo._train_expert("trec", recipe, out_dir=None, progress=True)  # type: ignore[arg-type]
    assert seen["enable_progress_bar"] is False
    (callback,) = seen["callbacks"]
    assert isinstance(callback, PlainProgress) and callback.label == "expert 'trec'"
