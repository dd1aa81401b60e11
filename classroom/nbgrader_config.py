"""nbgrader settings for a course that grades lora_lab's notebooks (01, 02 and 04 hold exercises).

Copy this file into the course folder (the folder that holds ``source/``); README.md's classroom
section walks through the whole round trip with nbgrader's own commands. What it sets, and why:

- Grading runs every cell of a submission on a fresh kernel. Notebook 04 trains models; with the
  series' default ``cpu`` profile that is minutes per submission (tens of minutes where nothing is
  cached), with the ``smoke`` profile seconds. The exercises do not depend on the profile: each is
  graded by ``lora_lab.checks`` on small models of the grader's own. So graded runs use ``smoke``
  (``LORA_LAB_PROFILE`` is read by every notebook; kernels inherit this process's environment).
- nbgrader's default cell timeout is 30 s, shorter than a training cell on a slow or busy machine:
  an interrupted cell makes every later cell fail and costs points a correct submission deserves.
  Each cell may run ``CELL_TIMEOUT`` seconds here; a graded run of one notebook takes about a minute
  at most on two cores (README gives measured times).
"""

import os

CELL_TIMEOUT = 600  # seconds per cell: catches a hung kernel, never a slow machine

c = get_config()  # noqa: F821 (nbgrader defines get_config for its config files)

c.CourseDirectory.course_id = "lora_lab"
os.environ.setdefault("LORA_LAB_PROFILE", "smoke")  # set LORA_LAB_PROFILE=cpu to grade at full size

# nbgrader's Execute preprocessor (validate, autograde) subclasses nbconvert's ExecutePreprocessor.
c.ExecutePreprocessor.timeout = CELL_TIMEOUT
c.Execute.timeout = CELL_TIMEOUT
