"""pyproject.toml lists its packages by hand (kernels/ installs as robust_unlearn.kernels): every
folder of Python modules must be in that list, or a non-editable install silently misses it."""
import tomllib

from conftest import REPO


def test_every_subpackage_is_listed():
    listed = set(tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    found = {"robust_unlearn." + ".".join(p.parent.relative_to(REPO / "robust_unlearn").parts)
             for p in (REPO / "robust_unlearn").rglob("*.py") if p.parent != REPO / "robust_unlearn"}
    assert found | {"robust_unlearn", "robust_unlearn.kernels"} == listed
    assert not (REPO / "kernels" / "__init__.py").exists()  # never a top-level `kernels` package
