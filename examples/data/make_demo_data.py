"""Make the bundled demo dataset: ADGEN-style attribute strings -> ad copy, written by rules here.

Every record is generated from the phrase tables below (no text is taken from ADGEN itself), so the
sample is ours to ship. Run: python examples/data/make_demo_data.py  (writes src/glmtune/demo_data/demo_{train,dev}.jsonl).
"""

import json
import random
from pathlib import Path

GARMENTS = {
    "上衣": ["衬衫", "T恤", "卫衣", "毛衣"],
    "裙": ["连衣裙", "半身裙", "百褶裙"],
    "裤": ["阔腿裤", "牛仔裤", "休闲裤"],
    "外套": ["夹克", "风衣", "西装"],
}
PHRASES = {
    "材质": {
        "棉": "选用柔软的纯棉面料，亲肤透气，穿着舒适",
        "牛仔布": "采用经典牛仔布，耐磨有型，越穿越有味道",
        "针织": "针织面料柔软有弹性，贴合身形又不紧绷",
        "雪纺": "轻盈的雪纺面料，垂坠飘逸，清爽不闷热",
        "真丝": "真丝面料光泽细腻，触感顺滑，尽显高级质感",
    },
    "颜色": {
        "白色": "干净的白色百搭又显气质",
        "黑色": "经典黑色低调耐看，轻松显瘦",
        "红色": "明艳的红色衬肤显白，元气满满",
        "蓝色": "清新的蓝色带来夏日般的清爽",
        "卡其色": "温柔的卡其色复古又文艺",
    },
    "风格": {
        "简约": "简约的设计不失大方，日常通勤都能驾驭",
        "复古": "复古的格调散发出浓浓的怀旧气息",
        "文艺": "文艺清新的气质，彰显独特品味",
        "休闲": "休闲随性的风格，周末出游轻松自在",
        "甜美": "甜美可爱的风格，尽显少女感",
    },
    "图案": {
        "印花": "精美的印花点缀其间，增添灵动感",
        "条纹": "经典条纹元素，利落又有层次",
        "格子": "格子图案经典耐看，充满学院气息",
        "刺绣": "精致的刺绣细节，彰显别样时尚",
        "纯色": "纯色设计简洁大方，易于搭配",
    },
    "版型": {
        "宽松": "宽松的版型包容性强，遮肉又舒适",
        "修身": "修身的剪裁勾勒出优美的身体线条",
        "显瘦": "显瘦的版型巧妙修饰身材",
    },
}
OPENINGS = ["这款{name}", "这件{name}", "此款{name}"]
ENDINGS = ["，是衣橱里不可缺少的单品。", "，让你轻松穿出时尚感。", "，值得入手。"]


def make_record(rng: random.Random) -> dict:
    garment_type = rng.choice(list(GARMENTS))
    name = rng.choice(GARMENTS[garment_type])
    keys = rng.sample(list(PHRASES), k=rng.randint(3, 5))
    chosen = [(key, rng.choice(list(PHRASES[key]))) for key in keys]
    content = "*".join([f"类型#{garment_type}"] + [f"{k}#{v}" for k, v in chosen] + [f"款式#{name}"])
    summary = rng.choice(OPENINGS).format(name=name) + "，" + "，".join(PHRASES[k][v] for k, v in chosen)
    return {"content": content, "summary": summary + rng.choice(ENDINGS)}


def main() -> None:
    rng = random.Random(2026)
    here = Path(__file__).resolve().parents[2] / "src" / "glmtune" / "demo_data"
    for name, count in (("demo_train.jsonl", 400), ("demo_dev.jsonl", 40)):
        with open(here / name, "w", encoding="utf-8") as out:
            for _ in range(count):
                out.write(json.dumps(make_record(rng), ensure_ascii=False) + "\n")


if __name__ == "__main__":
    main()
