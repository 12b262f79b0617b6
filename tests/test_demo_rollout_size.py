"""`vmla-train demo-rollout` refuses a real-size student on CPU (minutes) in one line, exit 2, unless
--allow-large-on-cpu. The parameters are counted on the meta device: no test here builds a real model."""

from pathlib import Path

import pytest

from vmla_train import cli, student

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def spy(monkeypatch):
    """Records every rollout started (``run_demo`` replaced: nothing runs) and the device type of every student
    built (only meta allowed)."""
    calls = {"rollouts": [], "devices": set()}
    real_init = student.WanStudent.__init__

    def init(self, *args, **kwargs):
        real_init(self, *args, **kwargs)
        calls["devices"] |= {p.device.type for p in self.parameters()}

    monkeypatch.setattr(student.WanStudent, "__init__", init)
    monkeypatch.setattr(cli, "run_demo", lambda cfg: calls["rollouts"].append(cfg.model.name))
    return calls


@pytest.mark.timeout(60)
@pytest.mark.parametrize("config, size", [("videomla-1.3b.yaml", "1,338 M"), ("wan-14b-mha.yaml", "14,288 M")])
def test_large_student_on_cpu_is_refused(spy, capsys, config, size):
    assert cli.main(["demo-rollout", str(ROOT / "configs" / config), "runtime.device=cpu"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"error: demo-rollout of '{ROOT / 'configs' / config}' would build a {size}-parameter")
    assert "limit on CPU is 100 M" in err[0] and "--allow-large-on-cpu" in err[0]
    assert spy["rollouts"] == [] and spy["devices"] == {"meta"}


@pytest.mark.timeout(60)
def test_opt_in_runs_large_and_small_runs_unasked(spy):
    assert cli.main(["demo-rollout", str(ROOT / "configs/videomla-1.3b.yaml"), "runtime.device=cpu",
                     "--allow-large-on-cpu"]) == 0
    assert cli.main(["demo-rollout", str(ROOT / "configs/demo.yaml")]) == 0  # tiny: 0.09 M parameters
    assert spy["rollouts"] == ["wan-1.3b", "tiny"] and spy["devices"] <= {"meta"}
