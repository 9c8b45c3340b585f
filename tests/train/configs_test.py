"""Every shipped config file validates into the typed Config."""
import glob
import importlib.util
import os

import pytest

from tunejax import config as config_lib, errors
from tunejax.train import config as tcfg

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(__file__)))
FILES = sorted(f for f in glob.glob(os.path.join(ROOT, "configs", "*.py"))
               if not f.endswith("common.py"))


def load(path):
  spec = importlib.util.spec_from_file_location(os.path.basename(path), path)
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  return mod.get_config()


@pytest.mark.parametrize("path", FILES, ids=os.path.basename)
def test_config_file_validates(path):
  cfg = tcfg.from_configdict(load(path))
  assert cfg.task in tcfg.TASKS


def test_unknown_nested_key_names_the_path():
  c = load(os.path.join(ROOT, "configs", "tiny.py")).to_dict()
  c["data"]["seq_lenn"] = 3
  with pytest.raises(errors.ConfigError, match=r"config\.data\.seq_lenn.*seq_len"):
    config_lib.build(tcfg.Config, c, "")


def test_wrong_type_names_the_key():
  c = load(os.path.join(ROOT, "configs", "tiny.py")).to_dict()
  c["total_steps"] = "many"
  with pytest.raises(errors.ConfigError, match="config.total_steps"):
    config_lib.build(tcfg.Config, c, "")
