"""One tiny random HF Llama (torch) shared by the PEFT comparison tests."""
import pytest


@pytest.fixture(scope="session")
def hf_llama(tmp_path_factory):
  """(torch model, saved dir, tunejax ModelConfig, tunejax params)."""
  pytest.importorskip("peft")
  from tests.models.conftest import _build, _hf_configs
  from tunejax import models
  path = str(tmp_path_factory.mktemp("peft_hf") / "llama")
  model = _build("llama", _hf_configs()["llama"], path)
  cfg, params = models.load(path)
  return model, path, cfg, params


@pytest.fixture(scope="module")
def base():
  """(random tiny-preset params, a [2, 12] token batch)."""
  import jax
  from tunejax import models
  from tests.peft.common import CFG
  params = models.init(CFG, jax.random.PRNGKey(0))
  tokens = jax.random.randint(jax.random.PRNGKey(1), (2, 12), 0, 256)
  return params, tokens
