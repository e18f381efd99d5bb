"""Small Chinese and English document sets with questions whose answer passage is known (kb and serve tests)."""

from __future__ import annotations

import json
from pathlib import Path

CHINESE = {
    "熊猫.md": "# 大熊猫\n\n大熊猫主要生活在中国四川、陕西和甘肃的山区。\n\n"
              "大熊猫的食物几乎全是竹子，成年大熊猫每天要吃十几公斤竹子。\n\n"
              "大熊猫的寿命在野外约为二十年，在圈养条件下可以超过三十年。",
    "茶.txt": "中国茶叶\n\n绿茶不经过发酵，代表品种有西湖龙井和碧螺春。\n\n"
             "红茶是全发酵茶，祁门红茶产自安徽省祁门县。\n\n"
             "乌龙茶属于半发酵茶，铁观音是福建安溪的名茶。",
    "长城.md": "## 长城\n\n长城东起山海关，西至嘉峪关，全长两万多公里。\n\n"
              "明朝为了防御北方的游牧民族，大规模修建了长城。\n\n"
              "八达岭长城位于北京市延庆区，是游客最多的一段。",
}
CHINESE_QUESTIONS = [
    {"q": "大熊猫吃什么？", "doc": "熊猫.md", "key": "食物几乎全是竹子"},
    {"q": "大熊猫能活多少年", "doc": "熊猫.md", "key": "寿命在野外约为二十年"},
    {"q": "祁门红茶的产地在哪里？", "doc": "茶.txt", "key": "祁门县"},
    {"q": "铁观音是什么茶", "doc": "茶.txt", "key": "铁观音是福建安溪的名茶"},
    {"q": "长城有多长？", "doc": "长城.md", "key": "全长两万多公里"},
    {"q": "明朝为什么修建长城", "doc": "长城.md", "key": "防御北方的游牧民族"},
]

ENGLISH = {
    "rivers.md": "# Rivers\n\nThe Nile flows north through eleven countries into the Mediterranean Sea.\n\n"
                 "The Amazon carries more water than any other river on Earth.\n\n"
                 "The Danube passes through four capital cities, including Vienna and Budapest.",
    "planets.txt": "Mars is called the red planet because of iron oxide on its surface.\n\n"
                   "Jupiter is the largest planet; its Great Red Spot is a storm older than three centuries.\n\n"
                   "Saturn's rings are made mostly of ice particles with some rock.",
    "bread.html": "<html><head><style>p {color: red}</style></head><body><h1>Baking bread</h1>"
                  "<p>Yeast ferments sugars and releases carbon dioxide, which makes the dough rise.</p>"
                  "<p>Sourdough uses a starter of wild yeast and lactic acid bacteria.</p>"
                  "<script>var tracking = 1;</script></body></html>",
}
ENGLISH_QUESTIONS = [
    {"q": "Which river carries the most water?", "doc": "rivers.md", "key": "The Amazon carries more water"},
    {"q": "Which capital cities does the Danube pass?", "doc": "rivers.md", "key": "Vienna and Budapest"},
    {"q": "Why is Mars red?", "doc": "planets.txt", "key": "iron oxide"},
    {"q": "What are Saturn's rings made of?", "doc": "planets.txt", "key": "ice particles"},
    {"q": "What makes dough rise?", "doc": "bread.html", "key": "carbon dioxide"},
    {"q": "What is in a sourdough starter?", "doc": "bread.html", "key": "lactic acid bacteria"},
]


def write_documents(folder: Path, documents: dict[str, str]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for name, text in documents.items():
        (folder / name).write_text(text, encoding="utf-8")
    return folder


def write_questions(path: Path, questions: list[dict]) -> Path:
    path.write_text("".join(json.dumps(q, ensure_ascii=False) + "\n" for q in questions), encoding="utf-8")
    return path


def minilm_folder(folder: Path) -> Path:
    """all-MiniLM-L6-v2 from its PyPI package (the kb extra's test model), extracted once per folder."""
    from all_minilm_l6_v2 import extract_model

    target = folder / "all-MiniLM-L6-v2"
    return target if (target / "config.json").exists() else Path(extract_model(str(folder)))
