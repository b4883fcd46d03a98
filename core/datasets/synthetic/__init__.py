"""A procedural Re-ID dataset in the exact Market-1501 layout (no downloads, deterministic).

Identity lives in attributes sampled per pid (clothing colours and patterns, lower-body type,
shoes, hair, build, carried item); cameras change what an identity looks like (background, light,
colour cast, scale, position, viewpoint, blur, JPEG quality), and consecutive frames of one camera
differ a little (walking pose, position). So matching across cameras needs the identity cues and
ignores the camera ones: a real, if small, Re-ID task.

A domain (`domains.DOMAINS`, `SyntheticSpec.domain`) sets the capture conditions every camera
samples from: scene family, light, viewpoint and sensor resolution ("campus", the default, is the
generator as it always was; "mall", "station", "street" differ as real datasets do). The same seed
gives the same identities in every domain, so datasets of two domains pose a domain gap.

Identity traits (`traits.IdentityTraits`, `SyntheticSpec.identity_traits`, off by default) add
what no caption names: a print on the top, body proportions, a fine texture on the lower garment,
the same in every camera, so two identities with equal descriptions still differ in the images.

Output under `out`::

    bounding_box_train/0001_c1s1_000123_00.jpg   train ids 1..N, `images_per_camera` frames/camera
    query/                                       test ids N+1..2N, one image per camera it is in
    bounding_box_test/                           the other test images, plus distractors (0000_*)
                                                 and junk (-1_*) to exercise the conventions
    attributes.jsonl                             per pid: attributes and an English description
    traits.jsonl                                 per pid: its identity traits (only with them on)
    synthetic.json                               the spec that produced the folder

Images are 128x64 (H x W) JPEGs. Every random choice comes from a generator seeded by
(seed, stream, keys...), so the same spec gives byte-identical files, and an identity's
attributes do not depend on how many identities come after it.

Modules: `attributes` (identities and cameras), `domains` (capture conditions), `render` (drawing),
`traits` (what no caption names), `dataset` (plan and write).
CLI: `python -m core.datasets.synthetic --out DIR --ids N --cameras C --seed S [--domain D] [--identity-traits]`.
"""

from core.datasets.synthetic.attributes import (  # noqa: F401
    ATTRIBUTES_FILE, PALETTE, VIEW_WORDS, CameraStyle, sequence_shots,
)
from core.datasets.synthetic.domains import DOMAINS, SyntheticDomain  # noqa: F401
from core.datasets.synthetic.dataset import (  # noqa: F401
    ensure_synthetic_dataset, generate_synthetic_dataset, planned_identity_images,
)
from core.datasets.synthetic.render import render_image  # noqa: F401
from core.datasets.synthetic.traits import TRAITS_FILE, IdentityTraits  # noqa: F401
