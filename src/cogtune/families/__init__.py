"""Model families: everything model-specific, behind one interface (`base.ModelFamily`), one file per
architecture (`cogvideox.py`), chosen by the registry from a pipeline's own model_index.json.

    base.py        the ModelFamily interface; config hashes, weight digests, meta-device models
    objectives.py  training objectives families build their step from (draws, v-prediction)
    cogvideox.py   the five CogVideoX variants (2b, 5b, 5b-I2V, 1.5-5B, 1.5-5B-I2V)
    registry.py    model_index.json _class_name -> family; the variants `cogtune init` knows
    models.py      ModelConfigs: a pipeline's config files, and the one place that loads weights
"""

from cogtune.families.base import ModelFamily
from cogtune.families.models import PUBLISHED_DIR, ModelConfigs, published_folder
from cogtune.families.registry import FAMILIES, VARIANTS, supported_pipelines

__all__ = ["FAMILIES", "PUBLISHED_DIR", "VARIANTS", "ModelConfigs", "ModelFamily", "published_folder",
           "supported_pipelines"]
