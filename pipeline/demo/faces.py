"""Procedural synthetic faces with the 8 ABAW expressions, drawn with Pillow + numpy.

The demo pipeline needs images that a facial expression classifier can learn but
cannot solve by looking at a handful of pixels, without shipping a real face data
set.  Every face is built from three independent ingredients:

* ``weights`` -- an (8,) mixture over the expression classes.  Each class is a
  prototype vector of facial geometry parameters (brow height and slant, eye
  openness, mouth curvature/opening/width, nose wrinkle, cheek raise, ...) loosely
  following FACS action units; the face drawn uses
  ``neutral + sum_c weights[c] * (prototype_c - neutral)``, so intensities and
  video-style morphs between two expressions come out of the same formula.
* :class:`Identity` -- who the person is (face shape, skin tone, hair, feature
  positions, a resting expression bias, glasses/beard).  It stays fixed across all
  images of one person.
* :class:`Conditions` -- the per-photo nuisance (roll, yaw-like squash, scale,
  offset, brightness, lighting gradient, background, blur, sensor noise).

Several classes deliberately share cues (fear and surprise both raise the brows
and widen the eyes; anger and disgust both lower the brows; sadness and fear both
raise the inner brow corners) so that the task is not trivially separable.

Shapes are drawn as polygons at ``SUPERSAMPLE`` (4x) the output size and box-averaged
down for anti-aliasing.  Measured speed on one core of an AMD EPYC VM (Python 3.11,
Pillow 13, numpy 2.4): 1.45 ms per 112 px face at difficulty 1 (blur and noise are
about 0.6 ms of that) and 0.9 ms at difficulty 0; ``tests/demo/test_demo_faces.py``
prints the figure on every run.

A linear classifier on 24x24 grayscale pixels (ridge, 480 training faces of random
people) reaches about 0.87 accuracy at difficulty 0 but only about 0.47 at
difficulty 1, where the small misalignments already break pixel correspondence.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

EXPRESSION_NAMES: tuple[str, ...] = (
    "Neutral",
    "Anger",
    "Disgust",
    "Fear",
    "Happiness",
    "Sadness",
    "Surprise",
    "Other",
)
NUM_EXPRESSIONS = 8

# Drawing happens at this multiple of the output size and is box-averaged down:
# 4x4 coverage samples per pixel give smooth edges, and Image.reduce is ~15x
# cheaper than a LANCZOS resize, which would eat a third of the time budget.
SUPERSAMPLE = 4

# Geometry parameters, in face units (the face half-width is about 1) unless the
# name says otherwise.  Signs: "raise"/"curve" positive means upwards on screen.
GEOMETRY_PARAMETERS: tuple[str, ...] = (
    "brow_raise",  # whole brow shifted up
    "brow_inner_raise",  # inner (nose-side) brow corner up; negative gives the anger V
    "brow_outer_raise",  # outer brow corner up
    "brow_arch",  # brow middle pushed up (surprise arch)
    "brow_squeeze",  # inner brow corners pulled towards the nose
    "brow_asymmetry",  # brow on the image's right up, the other down, by this much
    "eye_openness",  # upper lid height multiplier (1 = neutral)
    "lower_lid_raise",  # 0..1 lower lid pushed up (cheek raise / lid tightening)
    "lid_droop",  # 0..1 outer half of the upper lid sagging
    "nose_wrinkle",  # 0..1 strength of wrinkle lines across the nose bridge
    "nostril_flare",  # 0..1 widening of the nose base
    "cheek_raise",  # 0..1 nasolabial folds, cheek apples, under-eye bulge
    "mouth_curve",  # mouth corners up (smile) / down (frown)
    "mouth_open",  # lip separation / jaw drop
    "mouth_width",  # relative change of mouth width
    "mouth_roundness",  # 0 = horizontally stretched opening, 1 = round "O"
    "upper_lip_raise",  # upper lip lifted off the lower lip (shows upper teeth)
    "lip_press",  # positive thins the lips, negative pushes them out (pout/pucker)
    "mouth_shift",  # whole mouth pushed sideways (positive = towards the image's right)
    "mouth_asymmetry",  # mouth corner on the image's left up, the other down
    "teeth",  # 0..1 how much of the opening is filled with teeth
    "tongue",  # 0..1 tongue sticking out
    "head_tilt",  # degrees of roll added to the photo roll
    "head_pitch",  # inner features shifted down (looking down) in face units
)
_PARAMETER_INDEX = {name: index for index, name in enumerate(GEOMETRY_PARAMETERS)}

_NEUTRAL_GEOMETRY: dict[str, float] = {"eye_openness": 1.0}

# Prototype values per class; parameters not listed keep their neutral value.
_PROTOTYPE_GEOMETRY: dict[str, dict[str, float]] = {
    "Neutral": {},
    "Anger": {
        # AU4 + AU7 + AU23/24: lowered V brows, tightened lids, pressed lips
        "brow_raise": -0.06,
        "brow_inner_raise": -0.10,
        "brow_outer_raise": 0.03,
        "brow_squeeze": 0.06,
        "eye_openness": 0.62,
        "lower_lid_raise": 0.5,
        "nostril_flare": 0.5,
        "mouth_curve": -0.035,
        "mouth_width": -0.12,
        "lip_press": 0.75,
        "head_pitch": 0.03,
    },
    "Disgust": {
        # AU9 + AU10 (+ unilateral AU14/15): nose wrinkle, raised upper lip, sneer
        "brow_raise": -0.05,
        "brow_inner_raise": -0.04,
        "brow_squeeze": 0.03,
        "eye_openness": 0.72,
        "lower_lid_raise": 0.6,
        "nose_wrinkle": 1.0,
        "nostril_flare": 0.6,
        "cheek_raise": 0.45,
        "upper_lip_raise": 0.055,
        "mouth_curve": -0.03,
        "mouth_asymmetry": 0.06,
        "mouth_shift": -0.03,
        "teeth": 0.7,
        "head_tilt": 3.0,
        "head_pitch": -0.02,
    },
    "Fear": {
        # AU1 + AU2 + AU4 + AU5 + AU20 + AU25: raised inner brows, wide eyes,
        # mouth open and stretched sideways
        "brow_raise": 0.07,
        "brow_inner_raise": 0.08,
        "brow_outer_raise": -0.03,
        "brow_squeeze": 0.04,
        "eye_openness": 1.55,
        "mouth_curve": -0.025,
        "mouth_open": 0.09,
        "mouth_width": 0.22,
        "mouth_roundness": 0.0,
        "lip_press": 0.35,
        "teeth": 0.6,
        "head_pitch": 0.02,
    },
    "Happiness": {
        # AU6 + AU12 (+ AU25): smile, raised cheeks, narrowed eyes
        "brow_raise": -0.01,
        "eye_openness": 0.72,
        "lower_lid_raise": 0.75,
        "cheek_raise": 1.0,
        "mouth_curve": 0.10,
        "mouth_open": 0.045,
        "mouth_width": 0.18,
        "mouth_roundness": 0.1,
        "teeth": 0.85,
        "lip_press": 0.2,
        "head_pitch": -0.01,
    },
    "Sadness": {
        # AU1 + AU4 + AU15 (+ AU17): inner brows up, drooping lids, mouth corners down
        "brow_raise": 0.005,
        "brow_inner_raise": 0.08,
        "brow_outer_raise": -0.045,
        "brow_squeeze": 0.03,
        "eye_openness": 0.82,
        "lid_droop": 0.5,
        "mouth_curve": -0.075,
        "mouth_width": -0.06,
        "lip_press": -0.25,
        "head_tilt": -3.0,
        "head_pitch": 0.05,
    },
    "Surprise": {
        # AU1 + AU2 + AU5 + AU26: high arched brows, very wide eyes, round open mouth
        "brow_raise": 0.14,
        "brow_inner_raise": 0.02,
        "brow_arch": 0.05,
        "eye_openness": 1.75,
        "mouth_open": 0.2,
        "mouth_width": -0.28,
        "mouth_roundness": 1.0,
        "teeth": 0.15,
        "head_pitch": -0.03,
    },
    "Other": {
        # Catch-all: one-sided brow raise, lips pursed and pushed sideways, tongue
        "brow_asymmetry": 0.12,
        "brow_raise": 0.02,
        "eye_openness": 0.9,
        "mouth_curve": 0.01,
        "mouth_open": 0.015,
        "mouth_width": -0.32,
        "mouth_roundness": 0.6,
        "lip_press": -0.7,
        "mouth_shift": 0.11,
        "mouth_asymmetry": -0.045,
        "tongue": 0.75,
        "head_tilt": 8.0,
    },
}


def _geometry_vector(values: dict[str, float]) -> np.ndarray:
    vector = np.zeros(len(GEOMETRY_PARAMETERS))
    for name, value in {**_NEUTRAL_GEOMETRY, **values}.items():
        vector[_PARAMETER_INDEX[name]] = value
    return vector


_NEUTRAL_VECTOR = _geometry_vector({})
# (8, P) offsets from neutral, so the blend is a single matrix product.
_PROTOTYPE_DELTAS = np.stack(
    [_geometry_vector(_PROTOTYPE_GEOMETRY[name]) - _NEUTRAL_VECTOR for name in EXPRESSION_NAMES]
)

_SKIN_TONES = np.array(
    [
        [247, 213, 190],
        [236, 188, 160],
        [222, 166, 120],
        [196, 136, 96],
        [160, 103, 66],
        [118, 74, 48],
        [82, 52, 36],
    ],
    dtype=float,
)
_HAIR_COLOURS = np.array(
    [
        [25, 20, 18],
        [55, 38, 28],
        [95, 62, 38],
        [150, 110, 65],
        [210, 180, 120],
        [150, 70, 35],
        [170, 170, 165],
    ],
    dtype=float,
)
_IRIS_COLOURS = np.array([[70, 45, 25], [40, 28, 20], [60, 100, 140], [70, 110, 70], [110, 90, 60]], dtype=float)

HAIR_STYLES: tuple[str, ...] = ("bald", "short", "long", "fringe", "curly")

RGB = tuple[int, int, int]


def _colour(values: np.ndarray) -> RGB:
    clipped = np.clip(np.rint(values), 0, 255).astype(int)
    return (int(clipped[0]), int(clipped[1]), int(clipped[2]))


@dataclass(frozen=True)
class Identity:
    """Who the person is: fixed across all images and frames of one person.

    Lengths are in face units (the reference face half-width is 1).
    """

    face_width: float  # outline half-width
    face_height_ratio: float  # outline half-height / half-width
    jaw_taper: float  # 0 = round jaw, 1 = pointed chin
    skin: RGB
    hair: RGB
    hair_style: int  # index into HAIR_STYLES
    hairline: float  # y of the hairline centre (negative = above the eyes)
    hair_part: float  # sideways offset of the hairline peak / fringe sweep
    eye_spacing: float  # half distance between the eye centres
    eye_height: float  # y of the eye centres
    eye_size: float  # eye half-width
    iris: RGB
    brow_gap: float  # vertical distance between eye centre and brow
    brow_thickness: float
    brow_length: float  # multiplier on the brow span
    nose_length: float  # y of the nose base
    nose_width: float  # half-width of the nose base
    mouth_height: float  # y of the mouth line
    mouth_width: float  # mouth half-width
    lip_thickness: float
    lip_tint: float  # 0 = lips close to skin colour, 1 = strongly red
    ear_size: float
    shirt: RGB
    glasses: bool
    beard: float  # 0 = clean shaven, 1 = dark full stubble
    resting_mouth_curve: float  # some people look slightly happy or sad at rest
    resting_brow_inner: float
    resting_eye_openness: float  # multiplier on eye openness
    gaze_x: float  # where the irises sit inside the eye, -1..1
    gaze_y: float

    @classmethod
    def sample(cls, rng: np.random.Generator) -> Identity:
        """Draw a random person."""
        tone_position = rng.uniform(0, len(_SKIN_TONES) - 1)
        low = int(tone_position)
        high = min(low + 1, len(_SKIN_TONES) - 1)
        skin = _SKIN_TONES[low] + (tone_position - low) * (_SKIN_TONES[high] - _SKIN_TONES[low])
        skin = skin * rng.uniform(0.94, 1.06) + rng.normal(0, 5, 3)
        hair = _HAIR_COLOURS[rng.integers(len(_HAIR_COLOURS))] * rng.uniform(0.8, 1.15) + rng.normal(0, 6, 3)
        iris = _IRIS_COLOURS[rng.integers(len(_IRIS_COLOURS))] + rng.normal(0, 8, 3)
        shirt = rng.uniform(20, 235, 3)
        hair_style = int(rng.choice(len(HAIR_STYLES), p=[0.1, 0.35, 0.25, 0.15, 0.15]))
        return cls(
            face_width=float(rng.uniform(0.86, 1.06)),
            face_height_ratio=float(rng.uniform(1.18, 1.42)),
            jaw_taper=float(rng.uniform(0.0, 1.0)),
            skin=_colour(skin),
            hair=_colour(hair),
            hair_style=hair_style,
            hairline=float(rng.uniform(-0.95, -0.72)),
            hair_part=float(rng.uniform(-0.35, 0.35)),
            eye_spacing=float(rng.uniform(0.34, 0.44)),
            eye_height=float(rng.uniform(-0.16, -0.04)),
            eye_size=float(rng.uniform(0.14, 0.19)),
            iris=_colour(iris),
            brow_gap=float(rng.uniform(0.17, 0.24)),
            brow_thickness=float(rng.uniform(0.035, 0.075)),
            brow_length=float(rng.uniform(0.9, 1.15)),
            nose_length=float(rng.uniform(0.24, 0.36)),
            nose_width=float(rng.uniform(0.09, 0.14)),
            mouth_height=float(rng.uniform(0.56, 0.68)),
            mouth_width=float(rng.uniform(0.22, 0.30)),
            lip_thickness=float(rng.uniform(0.035, 0.065)),
            lip_tint=float(rng.uniform(0.2, 1.0)),
            ear_size=float(rng.uniform(0.85, 1.15)),
            shirt=_colour(shirt),
            glasses=bool(rng.random() < 0.15),
            beard=float(rng.uniform(0.2, 0.75)) if rng.random() < 0.2 else 0.0,
            resting_mouth_curve=float(rng.normal(0, 0.012)),
            resting_brow_inner=float(rng.normal(0, 0.012)),
            resting_eye_openness=float(rng.uniform(0.85, 1.15)),
            gaze_x=float(rng.uniform(-0.35, 0.35)),
            gaze_y=float(rng.uniform(-0.2, 0.2)),
        )


@dataclass(frozen=True)
class Conditions:
    """Per-photo nuisance: pose, framing, lighting, background and camera quality."""

    roll: float  # degrees, counter-clockwise on screen
    yaw: float  # -1..1: squashes the face horizontally and slides the features sideways
    scale: float  # face size relative to the reference framing
    offset_x: float  # face centre shift as a fraction of the image size
    offset_y: float
    brightness: float  # global gain
    light_angle: float  # radians, direction the lighting gradient rises towards
    light_strength: float  # gain difference between the two image edges is about 2x this
    background: RGB
    blur_radius: float  # gaussian blur radius in output pixels at 112 px (scaled with size)
    noise_sigma: float  # gaussian sensor noise, in 0..255 intensity units

    @classmethod
    def sample(cls, rng: np.random.Generator, difficulty: float = 1.0) -> Conditions:
        """Draw photo conditions; ``difficulty`` scales every nuisance range.

        0 gives a clean, centred, frontal, evenly lit photo on a grey background,
        1 the default spread, and values above 1 widen the ranges further.
        """
        difficulty = max(0.0, float(difficulty))
        # Draw every random number regardless of difficulty so that the same rng
        # state yields the "same" photo at different difficulties.
        # Default geometric ranges mimic residual misalignment of aligned face
        # crops (as in the ABAW cropped-aligned release), not in-the-wild framing.
        roll = rng.uniform(-1, 1) * 6.0
        yaw = rng.uniform(-1, 1) * 0.3
        scale = rng.uniform(-1, 1) * 0.06
        offset_x, offset_y = rng.uniform(-1, 1, 2) * 0.025
        brightness = rng.normal(0, 0.22)
        light_angle = rng.uniform(0, 2 * math.pi)
        light_strength = rng.uniform(0, 0.35)
        background_random = rng.uniform(0, 255, 3)
        blur = rng.uniform(0, 1.0) ** 2 * 1.4
        noise = rng.uniform(0, 9.0)
        grey = np.full(3, 128.0)
        background_mix = min(difficulty, 1.0)
        return cls(
            roll=float(np.clip(roll * difficulty, -60, 60)),
            yaw=float(np.clip(yaw * difficulty, -0.9, 0.9)),
            scale=float(max(0.55, 1.0 + scale * difficulty)),
            offset_x=float(np.clip(offset_x * difficulty, -0.25, 0.25)),
            offset_y=float(np.clip(offset_y * difficulty, -0.25, 0.25)),
            brightness=float(math.exp(np.clip(brightness * difficulty, -1.5, 1.0))),
            light_angle=float(light_angle),
            light_strength=float(min(light_strength * difficulty, 0.8)),
            background=_colour(grey + background_mix * (background_random - grey)),
            blur_radius=float(min(blur * difficulty, 4.0)),
            noise_sigma=float(min(noise * difficulty, 40.0)),
        )

    def jitter(self, rng: np.random.Generator, amount: float) -> Conditions:
        """Return a slightly perturbed copy; ``amount`` 1 is a typical frame-to-frame change."""
        step = rng.normal(0, 1, 9) * amount
        background = np.asarray(self.background, dtype=float) + rng.normal(0, 1.5 * amount, 3)
        return dataclasses.replace(
            self,
            roll=float(np.clip(self.roll + 1.0 * step[0], -60, 60)),
            yaw=float(np.clip(self.yaw + 0.03 * step[1], -0.9, 0.9)),
            scale=float(max(0.55, self.scale * (1.0 + 0.01 * step[2]))),
            offset_x=float(np.clip(self.offset_x + 0.005 * step[3], -0.25, 0.25)),
            offset_y=float(np.clip(self.offset_y + 0.005 * step[4], -0.25, 0.25)),
            brightness=float(max(0.05, self.brightness * math.exp(0.02 * step[5]))),
            light_angle=float(self.light_angle + 0.05 * step[6]),
            light_strength=float(np.clip(self.light_strength + 0.01 * step[7], 0.0, 0.8)),
            background=_colour(background),
            blur_radius=float(np.clip(self.blur_radius + 0.05 * step[8], 0.0, 4.0)),
        )


def expression_weights(expression: int, intensity: float) -> np.ndarray:
    """(8,) float weights: ``intensity`` on ``expression``, 1-intensity on Neutral (Neutral -> one-hot neutral)."""
    if not 0 <= expression < NUM_EXPRESSIONS:
        raise ValueError(f"expression must be in [0, {NUM_EXPRESSIONS}), got {expression}")
    if not 0.0 <= intensity <= 1.0:
        raise ValueError(f"intensity must be in [0, 1], got {intensity}")
    weights = np.zeros(NUM_EXPRESSIONS)
    if expression == 0:
        # Set directly: (1 - x) + x is not always exactly 1.0 in floating point.
        weights[0] = 1.0
    else:
        weights[0] = 1.0 - intensity
        weights[expression] = intensity
    return weights


def expression_geometry(weights: np.ndarray) -> dict[str, float]:
    """Blend the class prototypes: neutral + sum_c weights[c] * (prototype_c - neutral)."""
    weights = np.asarray(weights, dtype=float)
    if weights.shape != (NUM_EXPRESSIONS,):
        raise ValueError(f"weights must have shape ({NUM_EXPRESSIONS},), got {weights.shape}")
    vector = _NEUTRAL_VECTOR + weights @ _PROTOTYPE_DELTAS
    return dict(zip(GEOMETRY_PARAMETERS, vector.tolist()))


def _blend(colour_a: RGB, colour_b: RGB, amount: float) -> RGB:
    """Linear mix from ``colour_a`` (amount 0) to ``colour_b`` (amount 1)."""
    amount = min(max(amount, 0.0), 1.0)
    return (
        int(round(colour_a[0] + (colour_b[0] - colour_a[0]) * amount)),
        int(round(colour_a[1] + (colour_b[1] - colour_a[1]) * amount)),
        int(round(colour_a[2] + (colour_b[2] - colour_a[2]) * amount)),
    )


def _scaled(colour: RGB, factor: float) -> RGB:
    """Darken (factor < 1) or lighten a colour; plain Python because it runs ~20 times per face."""
    red, green, blue = (min(255, max(0, int(round(channel * factor)))) for channel in colour)
    return (red, green, blue)


class _Projector:
    """Maps face-unit points to supersampled pixel coordinates.

    ``depth`` says how far in front of the outline a feature sits, so the yaw-like
    slide and the expression's head pitch move the nose more than the ears.
    """

    def __init__(self, canvas_size: int, conditions: Conditions, head_tilt: float, head_pitch: float):
        # Framing like an aligned face crop: the face fills most of the image.
        self.unit = 0.29 * canvas_size * conditions.scale
        self.centre_x = canvas_size * (0.5 + conditions.offset_x)
        self.centre_y = canvas_size * (0.53 + conditions.offset_y)
        angle = math.radians(conditions.roll + head_tilt)
        self.cos = math.cos(angle)
        self.sin = math.sin(angle)
        self.squash = 1.0 - 0.22 * abs(conditions.yaw)
        self.slide = 0.25 * conditions.yaw
        self.pitch = head_pitch

    def __call__(self, x: np.ndarray, y: np.ndarray, depth: float) -> list[float]:
        if np.shape(x) != np.shape(y):
            x, y = np.broadcast_arrays(x, y)
        view_x = x * self.squash + self.slide * depth
        view_y = y + self.pitch * depth
        # Interleaved x0, y0, x1, y1, ... is the flat sequence Pillow accepts.
        points = np.empty((view_x.size, 2))
        points[:, 0] = self.centre_x + self.unit * (self.cos * view_x + self.sin * view_y)
        points[:, 1] = self.centre_y + self.unit * (self.cos * view_y - self.sin * view_x)
        return points.ravel().tolist()


# Shared parameter grids, built once because rendering is in the hot path.
_OUTLINE_ANGLES = np.linspace(0, 2 * math.pi, 48, endpoint=False)
_CURVE_T = np.linspace(-1.0, 1.0, 15)
_CIRCLE_ANGLES = np.linspace(0, 2 * math.pi, 18, endpoint=False)
_COS_CIRCLE = np.cos(_CIRCLE_ANGLES)
_SIN_CIRCLE = np.sin(_CIRCLE_ANGLES)
_SHOULDERS_X = np.concatenate(([-2.6], np.linspace(-2.4, 2.4, 9), [2.6]))
_SHOULDERS_Y = np.concatenate(([4.0], 1.62 + 0.45 * (np.linspace(-2.4, 2.4, 9) / 2.4) ** 2, [4.0]))


def _face_outline(identity: Identity, jaw_drop: float) -> tuple[np.ndarray, np.ndarray]:
    """Outline points running right -> chin -> left -> crown."""
    half_width = identity.face_width
    half_height = identity.face_width * identity.face_height_ratio
    sin = np.sin(_OUTLINE_ANGLES)
    lower = np.clip(sin, 0, None)
    # The jaw narrows towards the chin and drops when the mouth opens.
    x = half_width * np.cos(_OUTLINE_ANGLES) * (1.0 - 0.3 * identity.jaw_taper * lower**2)
    y = half_height * sin * (1.0 + jaw_drop * lower)
    return x, y


def _draw_hair_back(draw: ImageDraw.ImageDraw, project: _Projector, identity: Identity) -> None:
    style = HAIR_STYLES[identity.hair_style]
    half_width = identity.face_width
    half_height = identity.face_width * identity.face_height_ratio
    if style == "long":
        angles = np.linspace(math.pi * 0.95, math.pi * 2.05, 20)
        top_x = 1.18 * half_width * np.cos(angles)
        top_y = 1.12 * half_height * np.sin(angles)
        x = np.concatenate(([-1.25 * half_width], top_x, [1.25 * half_width]))
        y = np.concatenate(([1.45], top_y, [1.45]))
        draw.polygon(project(x, y, -0.1), fill=_scaled(identity.hair, 0.85))
    elif style == "curly":
        x = 1.38 * half_width * _COS_CIRCLE
        y = 1.05 * half_height * _SIN_CIRCLE - 0.32
        draw.polygon(project(x, y, -0.1), fill=_scaled(identity.hair, 0.9))


def _draw_hair_front(draw: ImageDraw.ImageDraw, project: _Projector, identity: Identity, brow_top: float) -> None:
    style = HAIR_STYLES[identity.hair_style]
    if style == "bald":
        return
    half_width = identity.face_width
    half_height = identity.face_width * identity.face_height_ratio
    hairline = identity.hairline
    if style == "fringe":
        # Bangs stop above the highest brow position so they never hide the brows.
        hairline = max(hairline, brow_top - 0.12)
        hairline = min(hairline, brow_top - 0.08)
    curly = style == "curly"
    grow = 1.3 if curly else 1.07
    lift = 0.08 if curly else 0.0
    temple_y = -0.42 * half_height
    temple_x = half_width * math.sqrt(1.0 - 0.42**2)
    # The crown arc starts and ends at temple height so the outline has no notch.
    side_angle = math.asin(min(1.0, (0.42 * half_height - lift) / (grow * half_height)))
    angles = np.linspace(math.pi + side_angle, 2 * math.pi - side_angle, 16)
    top_x = grow * half_width * np.cos(angles)
    top_y = grow * half_height * np.sin(angles) - lift
    # Hairline runs from the right temple over the forehead back to the left temple.
    peak_x = identity.hair_part * half_width
    sweep = 0.06 if style == "fringe" else 0.0
    front_x = np.array([temple_x, 0.6 * half_width, peak_x, -0.6 * half_width, -temple_x])
    front_y = np.array([temple_y, hairline + 0.12 - sweep, hairline, hairline + 0.1 + sweep, temple_y])
    x = np.concatenate((top_x, front_x))
    y = np.concatenate((top_y, front_y))
    draw.polygon(project(x, y, 0.0), fill=identity.hair)


def _eye_lids(
    identity: Identity, geometry: dict[str, float], outer_sign: float
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """x offsets, upper lid y and lower lid y (relative to the eye centre)."""
    half_width = identity.eye_size
    openness = max(0.12, geometry["eye_openness"] * identity.resting_eye_openness)
    upper_height = 0.45 * half_width * openness
    lower_height = 0.3 * half_width * (1.0 - 0.75 * min(max(geometry["lower_lid_raise"], 0.0), 1.0))
    t = _CURVE_T
    bulge = 1.0 - t**2
    # Droop lowers the outer half of the upper lid (sad, tired look).
    outer = np.clip(t * outer_sign, 0, None)
    droop = 1.0 - 0.8 * geometry["lid_droop"] * outer
    upper = -upper_height * bulge**0.8 * droop
    lower = lower_height * bulge**0.9
    return half_width * t, upper, lower


def _draw_eye(
    draw: ImageDraw.ImageDraw,
    project: _Projector,
    identity: Identity,
    geometry: dict[str, float],
    side: float,
    line_width: int,
) -> None:
    centre_x = side * identity.eye_spacing
    centre_y = identity.eye_height
    # The outer corner of the left eye (side -1) is on the left.
    x, upper, lower = _eye_lids(identity, geometry, outer_sign=side)
    depth = 0.8
    skin = identity.skin
    raise_amount = min(max(geometry["cheek_raise"], 0.0), 1.0)
    if raise_amount > 0.01:
        # Cheek raise pushes up a bulge under the eye.
        bulge_y = centre_y + lower + 0.05 + 0.03 * (1 - raise_amount)
        draw.line(
            project(centre_x + x * 0.8, bulge_y, depth),
            fill=_blend(skin, _scaled(skin, 0.7), raise_amount),
            width=line_width,
        )
    # Eyelid crease above the opening.
    crease = centre_y + upper * 1.05 - 0.05
    draw.line(project(centre_x + x[2:-2], crease[2:-2], depth), fill=_scaled(skin, 0.82), width=line_width)
    lens_x = np.concatenate((x, x[::-1]))
    lens_y = centre_y + np.concatenate((upper, lower[::-1]))
    draw.polygon(project(centre_x + lens_x, lens_y, depth), fill=(238, 236, 230))
    # Iris and pupil are clipped analytically to the lid curves (they are functions of x).
    iris_radius = 0.52 * identity.eye_size
    iris_x = identity.gaze_x * 0.35 * identity.eye_size
    iris_y = identity.gaze_y * 0.15 * identity.eye_size
    for radius, fill in ((iris_radius, identity.iris), (0.45 * iris_radius, (15, 12, 12))):
        circle_x = np.clip(iris_x + radius * _COS_CIRCLE, x[0], x[-1])
        circle_y = iris_y + radius * _SIN_CIRCLE
        top = np.interp(circle_x, x, upper)
        bottom = np.interp(circle_x, x, lower)
        circle_y = np.clip(circle_y, top, bottom)
        draw.polygon(project(centre_x + circle_x, centre_y + circle_y, depth), fill=fill)
    draw.line(project(centre_x + x, centre_y + upper, depth), fill=(35, 25, 22), width=int(line_width * 1.6))
    draw.line(project(centre_x + x, centre_y + lower, depth), fill=_scaled(skin, 0.6), width=max(1, line_width // 2))


def _draw_brow(
    draw: ImageDraw.ImageDraw,
    project: _Projector,
    identity: Identity,
    geometry: dict[str, float],
    side: float,
    colour: RGB,
) -> None:
    inner_x = side * (identity.eye_spacing - identity.eye_size * 0.85 - geometry["brow_squeeze"])
    outer_x = side * (identity.eye_spacing + identity.eye_size * 1.2 * identity.brow_length)
    base_y = identity.eye_height - identity.brow_gap - geometry["brow_raise"] - side * geometry["brow_asymmetry"]
    inner_y = base_y - geometry["brow_inner_raise"] - identity.resting_brow_inner + 0.01
    outer_y = base_y - geometry["brow_outer_raise"] + 0.02
    middle_y = (inner_y + outer_y) / 2 - 0.035 - geometry["brow_arch"]
    # Quadratic Bezier through inner -> arch -> outer.
    t = (_CURVE_T[::2] + 1) / 2
    middle_x = (inner_x + outer_x) / 2
    x = (1 - t) ** 2 * inner_x + 2 * (1 - t) * t * middle_x + t**2 * outer_x
    y = (1 - t) ** 2 * inner_y + 2 * (1 - t) * t * (2 * middle_y - (inner_y + outer_y) / 2) + t**2 * outer_y
    # Thick at the inner end, tapering outwards.
    half_thickness = identity.brow_thickness * (1.0 - 0.5 * t) / 2
    polygon_x = np.concatenate((x, x[::-1]))
    polygon_y = np.concatenate((y - half_thickness, (y + half_thickness)[::-1]))
    draw.polygon(project(polygon_x, polygon_y, 0.8), fill=colour)


def _draw_wrinkles(
    draw: ImageDraw.ImageDraw,
    project: _Projector,
    identity: Identity,
    geometry: dict[str, float],
    line_width: int,
) -> None:
    skin = identity.skin
    wrinkle = _scaled(skin, 0.66)
    # Forehead lines appear when the brows go up (AU1/AU2), centred when only the inner part rises.
    lift = geometry["brow_raise"] + 0.5 * max(geometry["brow_inner_raise"], 0.0) + 0.3 * abs(geometry["brow_asymmetry"])
    forehead = min(max((lift - 0.03) / 0.08, 0.0), 1.0)
    if forehead > 0.02:
        top_brow = identity.eye_height - identity.brow_gap - geometry["brow_raise"]
        span = 0.3 + 0.25 * min(max(geometry["brow_raise"] / 0.12, 0.0), 1.0)
        line_x = np.linspace(-span, span, 7)
        for row in range(2):
            line_y = top_brow - 0.14 - 0.08 * row - 0.02 * np.cos(line_x * 3)
            fill = _blend(skin, wrinkle, forehead * (1 - 0.3 * row))
            draw.line(project(line_x, line_y, 0.7), fill=fill, width=line_width)
    # Vertical frown lines between the brows (AU4).
    lower_brow = -geometry["brow_inner_raise"] - geometry["brow_raise"] + geometry["brow_squeeze"]
    glabella = min(max((lower_brow - 0.03) / 0.1, 0.0), 1.0)
    if glabella > 0.02:
        top = identity.eye_height - identity.brow_gap - 0.02
        for side in (-1.0, 1.0):
            draw.line(
                project(np.array([side * 0.05, side * 0.04]), np.array([top - 0.07, top + 0.03]), 0.85),
                fill=_blend(skin, wrinkle, glabella),
                width=line_width,
            )
    # Horizontal creases across the nose bridge (AU9).
    nose = min(max(geometry["nose_wrinkle"], 0.0), 1.0)
    if nose > 0.02:
        for row in range(3):
            crease_y = identity.eye_height + 0.02 + 0.055 * row
            draw.line(
                project(np.array([-0.09, 0.0, 0.09]), crease_y + np.array([0.015, -0.01, 0.015]), 1.0),
                fill=_blend(skin, _scaled(skin, 0.55), nose),
                width=line_width,
            )


def _draw_nose(
    draw: ImageDraw.ImageDraw,
    project: _Projector,
    identity: Identity,
    geometry: dict[str, float],
    line_width: int,
) -> None:
    skin = identity.skin
    shade = _scaled(skin, 0.72)
    # The nose wrinkler (AU9) also pulls the nostrils up a little.
    base_y = identity.nose_length - 0.02 * max(geometry["nose_wrinkle"], 0.0)
    half_width = identity.nose_width * (1.0 + 0.3 * geometry["nostril_flare"])
    # A light shadow down one side of the bridge.
    bridge_y = np.array([identity.eye_height + 0.05, base_y - 0.15, base_y - 0.05])
    draw.line(
        project(np.array([0.05, 0.06, 0.08]), bridge_y, 1.1),
        fill=_scaled(skin, 0.85),
        width=line_width,
    )
    t = _CURVE_T[::2]
    x = half_width * t
    y = base_y + 0.035 * (1 - t**2) - 0.03 * t**4
    draw.line(project(x, y, 1.2), fill=shade, width=line_width)
    for side in (-1.0, 1.0):
        nostril_x = side * half_width * 0.55 + 0.045 * _COS_CIRCLE
        nostril_y = base_y + 0.01 + 0.02 * _SIN_CIRCLE
        draw.polygon(project(nostril_x, nostril_y, 1.15), fill=_scaled(skin, 0.45))


def _draw_cheeks(
    draw: ImageDraw.ImageDraw,
    project: _Projector,
    identity: Identity,
    geometry: dict[str, float],
    mouth_corners: tuple[tuple[float, float], tuple[float, float]],
    line_width: int,
) -> None:
    amount = min(max(geometry["cheek_raise"], 0.0), 1.0)
    if amount <= 0.01:
        return
    skin = identity.skin
    blush = _blend(skin, (min(255, skin[0] + 18), int(skin[1] * 0.85), int(skin[2] * 0.85)), amount)
    for side, (corner_x, corner_y) in zip((-1.0, 1.0), mouth_corners):
        cheek_x = side * (identity.eye_spacing + 0.05) + 0.13 * _COS_CIRCLE
        cheek_y = identity.eye_height + 0.33 - 0.07 * amount + 0.09 * _SIN_CIRCLE
        draw.polygon(project(cheek_x, cheek_y, 0.7), fill=blush)
        # Nasolabial fold from beside the nose to just outside the mouth corner.
        start_x = side * (identity.nose_width + 0.05)
        start_y = identity.nose_length - 0.06
        end_x = corner_x + side * 0.05
        end_y = corner_y + 0.03
        t = np.linspace(0, 1, 6)
        x = start_x + (end_x - start_x) * t + side * 0.06 * np.sin(t * math.pi)
        y = start_y + (end_y - start_y) * t
        draw.line(project(x, y, 0.8), fill=_blend(skin, _scaled(skin, 0.68), amount), width=line_width)


def _mouth_shapes(
    identity: Identity, geometry: dict[str, float]
) -> dict[str, np.ndarray | float]:
    """All mouth contours in face units (x and the four y curves over the same x)."""
    half_width = identity.mouth_width * max(0.35, 1.0 + geometry["mouth_width"])
    centre_x = geometry["mouth_shift"]
    centre_y = identity.mouth_height
    t = _CURVE_T
    x = centre_x + half_width * t
    curve = geometry["mouth_curve"] + identity.resting_mouth_curve
    asymmetry = geometry["mouth_asymmetry"]
    corner_lift = np.where(t < 0, curve + asymmetry, curve - asymmetry)
    middle = centre_y - corner_lift * t**2
    roundness = min(max(geometry["mouth_roundness"], 0.0), 1.0)
    # Exponent 0.5 is an ellipse ("O"); smaller exponents give a boxy, stretched opening.
    opening_shape = (1.0 - t**2) ** (0.2 + 0.3 * roundness)
    opening = max(geometry["mouth_open"], 0.0)
    inner_upper = middle - opening_shape * (0.3 * opening + max(geometry["upper_lip_raise"], 0.0))
    inner_lower = middle + opening_shape * 0.7 * opening
    thickness = identity.lip_thickness * (1.0 - 0.6 * geometry["lip_press"])
    thickness = max(0.008, thickness)
    lip_shape = np.sqrt(1.0 - t**2)
    # Cupid's bow: the upper lip dips slightly at the centre.
    bow = 1.0 - 0.25 * np.exp(-((t / 0.15) ** 2))
    outer_upper = inner_upper - 0.85 * thickness * lip_shape * bow
    outer_lower = inner_lower + 1.15 * thickness * lip_shape
    return {
        "x": x,
        "inner_upper": inner_upper,
        "inner_lower": inner_lower,
        "outer_upper": outer_upper,
        "outer_lower": outer_lower,
        "gap": float(np.max(inner_lower - inner_upper)),
    }


def _draw_mouth(
    draw: ImageDraw.ImageDraw,
    project: _Projector,
    identity: Identity,
    geometry: dict[str, float],
    shapes: dict[str, np.ndarray | float],
    line_width: int,
) -> None:
    depth = 0.9
    skin = identity.skin
    lip = _blend(
        _scaled(skin, 0.85),
        (min(255, int(skin[0] * 0.9 + 40)), int(skin[1] * 0.55), int(skin[2] * 0.6)),
        identity.lip_tint,
    )
    x = shapes["x"]
    inner_upper = shapes["inner_upper"]
    inner_lower = shapes["inner_lower"]
    # Closed loops: left -> right along the top contour, right -> left along the bottom one.
    loop_x = np.concatenate((x, x[::-1]))
    draw.polygon(
        project(loop_x, np.concatenate((shapes["outer_upper"], shapes["outer_lower"][::-1])), depth),
        fill=lip,
    )
    if shapes["gap"] > 0.004:
        draw.polygon(
            project(loop_x, np.concatenate((inner_upper, inner_lower[::-1])), depth),
            fill=(55, 20, 25),
        )
        teeth = min(max(geometry["teeth"], 0.0), 1.0)
        if teeth > 0.02:
            # Upper teeth hang from the upper lip and never pass the lower lip.
            band = inner_upper + np.minimum(inner_lower - inner_upper, 0.06 * teeth)
            inner = slice(2, -2)
            teeth_x = np.concatenate((x[inner], x[inner][::-1]))
            teeth_y = np.concatenate((inner_upper[inner], band[inner][::-1]))
            draw.polygon(project(teeth_x, teeth_y, depth), fill=(236, 232, 218))
    draw.line(project(x, inner_upper, depth), fill=_scaled(lip, 0.55), width=line_width)
    tongue = min(max(geometry["tongue"], 0.0), 1.0)
    if tongue > 0.02:
        middle = len(x) // 2
        tongue_x = x[middle] + 0.08 * _COS_CIRCLE * (0.6 + 0.4 * tongue)
        tongue_y = inner_lower[middle] + 0.03 * tongue + 0.07 * tongue * _SIN_CIRCLE
        draw.polygon(project(tongue_x, tongue_y, depth + 0.1), fill=(205, 85, 95))


def _draw_glasses(draw: ImageDraw.ImageDraw, project: _Projector, identity: Identity, line_width: int) -> None:
    frame = (30, 30, 35)
    half_width = identity.eye_size * 1.45
    half_height = identity.eye_size * 0.95
    # Rounded rectangle via a superellipse, drawn as a closed line.
    angles = np.append(_CIRCLE_ANGLES, _CIRCLE_ANGLES[0])
    cos = np.cos(angles)
    sin = np.sin(angles)
    rim_x = half_width * np.sign(cos) * np.abs(cos) ** 0.6
    rim_y = half_height * np.sign(sin) * np.abs(sin) ** 0.6
    for side in (-1.0, 1.0):
        centre_x = side * identity.eye_spacing
        draw.line(project(centre_x + rim_x, identity.eye_height + 0.02 + rim_y, 0.9), fill=frame, width=line_width)
    inner = identity.eye_spacing - half_width
    draw.line(
        project(np.array([-inner, 0.0, inner]), identity.eye_height + np.array([-0.02, -0.04, -0.02]), 0.95),
        fill=frame,
        width=line_width,
    )


def render_face(
    weights: np.ndarray,
    identity: Identity,
    conditions: Conditions,
    size: int = 112,
    rng: np.random.Generator | None = None,
) -> Image.Image:
    """Draw one face as an RGB ``size`` x ``size`` image.

    ``rng`` only drives the sensor noise; without one a fixed seed is used so the
    output is still a pure function of the arguments.
    """
    geometry = expression_geometry(weights)
    if rng is None:
        rng = np.random.default_rng(0)
    canvas_size = size * SUPERSAMPLE
    canvas = Image.new("RGB", (canvas_size, canvas_size), conditions.background)
    draw = ImageDraw.Draw(canvas)
    project = _Projector(canvas_size, conditions, geometry["head_tilt"], geometry["head_pitch"])
    line_width = max(1, int(round(0.022 * project.unit)))
    skin = identity.skin

    # Back to front: hair behind the head, shoulders, neck, ears, face, features.
    _draw_hair_back(draw, project, identity)
    half_width = identity.face_width
    draw.polygon(project(_SHOULDERS_X, _SHOULDERS_Y, 0.0), fill=identity.shirt)
    draw.polygon(
        project(np.array([-0.42, -0.45, 0.45, 0.42]), np.array([0.7, 1.75, 1.75, 0.7]), 0.0), fill=_scaled(skin, 0.85)
    )
    for side in (-1.0, 1.0):
        ear_x = side * half_width * 0.97 + 0.1 * identity.ear_size * _COS_CIRCLE
        ear_y = identity.eye_height + 0.12 + 0.2 * identity.ear_size * _SIN_CIRCLE
        draw.polygon(project(ear_x, ear_y, 0.0), fill=_scaled(skin, 0.92))
    jaw_drop = 0.35 * max(geometry["mouth_open"], 0.0)
    outline_x, outline_y = _face_outline(identity, jaw_drop)
    draw.polygon(project(outline_x, outline_y, 0.0), fill=skin)
    shapes = _mouth_shapes(identity, geometry)
    if identity.beard > 0:
        # Stubble covers the jaw and upper lip; the outline points below the
        # cheeks already run right -> chin -> left, and the mouth is drawn over it.
        lower = outline_y > identity.mouth_height - 0.2
        top = identity.nose_length + 0.07
        beard_x = np.append(outline_x[lower], [-0.75 * half_width, -0.3, 0.3, 0.75 * half_width])
        beard_y = np.append(outline_y[lower], [identity.mouth_height - 0.1, top, top, identity.mouth_height - 0.1])
        draw.polygon(project(beard_x, beard_y, 0.1), fill=_blend(skin, _scaled(identity.hair, 0.8), identity.beard))

    brow_top = identity.eye_height - identity.brow_gap - identity.brow_thickness - 0.16
    _draw_hair_front(draw, project, identity, brow_top)
    _draw_wrinkles(draw, project, identity, geometry, line_width)
    corners = (
        (float(shapes["x"][0]), float(shapes["inner_upper"][0])),
        (float(shapes["x"][-1]), float(shapes["inner_upper"][-1])),
    )
    _draw_cheeks(draw, project, identity, geometry, corners, line_width)
    _draw_nose(draw, project, identity, geometry, line_width)
    brow_colour = _scaled(identity.hair, 0.75) if HAIR_STYLES[identity.hair_style] != "bald" else _scaled(skin, 0.4)
    for side in (-1.0, 1.0):
        _draw_eye(draw, project, identity, geometry, side, line_width)
        _draw_brow(draw, project, identity, geometry, side, brow_colour)
    _draw_mouth(draw, project, identity, geometry, shapes, line_width)
    if identity.glasses:
        _draw_glasses(draw, project, identity, line_width)

    image = canvas.reduce(SUPERSAMPLE)
    blur = conditions.blur_radius * size / 112
    if blur > 0.05:
        image = image.filter(ImageFilter.GaussianBlur(blur))
    return _apply_lighting_and_noise(image, conditions, rng)


def _apply_lighting_and_noise(image: Image.Image, conditions: Conditions, rng: np.random.Generator) -> Image.Image:
    size = image.size[0]
    pixels = np.asarray(image, dtype=np.float32)
    # A linear gain ramp stands in for a side light; it also darkens the background.
    ramp = np.linspace(-1.0, 1.0, size, dtype=np.float32)
    along_light = math.cos(conditions.light_angle) * ramp[None, :] + math.sin(conditions.light_angle) * ramp[:, None]
    gain = conditions.brightness * (1.0 + conditions.light_strength * along_light)
    pixels *= gain[:, :, None]
    if conditions.noise_sigma > 0:
        pixels += rng.standard_normal(pixels.shape, dtype=np.float32) * np.float32(conditions.noise_sigma)
    np.clip(pixels, 0, 255, out=pixels)
    return Image.fromarray(pixels.astype(np.uint8), "RGB")
