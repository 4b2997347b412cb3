"""The project's own sample corpus for CPU work: pretraining documents and fine-tuning dialogues.

Everything is generated from the small tables below with a seeded `random.Random`, so the files under
`configs/cpu/data/` are reproducible byte for byte (`python -m telechat2.tokenizer.train_tiny` rewrites them
and retrains the tiny tokenizer on them). The text is simple and regular on purpose: Chinese and English
sentences, arithmetic and unit conversions with correct answers, short Python functions, weather reports,
translations, and tool-calling dialogues, so that a tiny model learns visible patterns in a few hundred steps.
All facts stated (capitals, arithmetic, conversions) are true.
"""
from __future__ import annotations

import json
import os
import random

CITIES = [  # (English, Chinese)
    ("Beijing", "北京"), ("Shanghai", "上海"), ("Guangzhou", "广州"), ("Shenzhen", "深圳"), ("Hangzhou", "杭州"),
    ("Chengdu", "成都"), ("Wuhan", "武汉"), ("Xi'an", "西安"), ("Nanjing", "南京"), ("Chongqing", "重庆"),
    ("Tianjin", "天津"), ("Suzhou", "苏州"), ("London", "伦敦"), ("Paris", "巴黎"), ("Tokyo", "东京"),
    ("New York", "纽约"), ("Sydney", "悉尼"), ("Berlin", "柏林"), ("Rome", "罗马"), ("Cairo", "开罗"),
]
CAPITALS = [  # (country EN, country ZH, capital EN, capital ZH)
    ("China", "中国", "Beijing", "北京"), ("France", "法国", "Paris", "巴黎"), ("Japan", "日本", "Tokyo", "东京"),
    ("the United Kingdom", "英国", "London", "伦敦"), ("Germany", "德国", "Berlin", "柏林"),
    ("Italy", "意大利", "Rome", "罗马"), ("Spain", "西班牙", "Madrid", "马德里"), ("Russia", "俄罗斯", "Moscow", "莫斯科"),
    ("Egypt", "埃及", "Cairo", "开罗"), ("Canada", "加拿大", "Ottawa", "渥太华"),
    ("Australia", "澳大利亚", "Canberra", "堪培拉"), ("India", "印度", "New Delhi", "新德里"),
    ("South Korea", "韩国", "Seoul", "首尔"), ("Thailand", "泰国", "Bangkok", "曼谷"),
    ("Brazil", "巴西", "Brasília", "巴西利亚"), ("Kenya", "肯尼亚", "Nairobi", "内罗毕"),
]
WEATHER = [("sunny", "晴"), ("cloudy", "多云"), ("rainy", "小雨"), ("snowy", "小雪"), ("windy", "大风"),
           ("foggy", "有雾"), ("overcast", "阴")]
WORDS = [
    ("apple", "苹果"), ("book", "书"), ("water", "水"), ("teacher", "老师"), ("computer", "电脑"), ("cat", "猫"),
    ("dog", "狗"), ("friend", "朋友"), ("school", "学校"), ("phone", "手机"), ("music", "音乐"), ("tea", "茶"),
    ("river", "河流"), ("mountain", "山"), ("sun", "太阳"), ("moon", "月亮"), ("flower", "花"), ("train", "火车"),
    ("rice", "米饭"), ("library", "图书馆"), ("window", "窗户"), ("city", "城市"), ("student", "学生"),
    ("doctor", "医生"), ("bicycle", "自行车"), ("weather", "天气"), ("morning", "早上"), ("family", "家庭"),
    ("garden", "花园"), ("kitchen", "厨房"), ("number", "数字"), ("language", "语言"), ("question", "问题"),
    ("answer", "答案"), ("map", "地图"), ("bridge", "桥"), ("ocean", "海洋"), ("forest", "森林"),
]
NAMES_EN = ["Alice", "Bob", "Carol", "David", "Emma", "Frank", "Grace", "Henry", "Ivy", "Jack"]
NAMES_ZH = ["小明", "小红", "李雷", "韩梅梅", "王芳", "张伟", "刘洋", "陈静", "赵磊", "孙丽"]
ITEMS = [("apples", "个苹果"), ("books", "本书"), ("pencils", "支铅笔"), ("cards", "张卡片"), ("eggs", "个鸡蛋")]
UNITS = [  # (from, to, factor, from ZH, to ZH)
    ("kilometers", "meters", 1000, "千米", "米"), ("meters", "centimeters", 100, "米", "厘米"),
    ("kilograms", "grams", 1000, "千克", "克"), ("hours", "minutes", 60, "小时", "分钟"),
    ("minutes", "seconds", 60, "分钟", "秒"), ("liters", "milliliters", 1000, "升", "毫升"),
]

TOOLS = {
    "get_weather": {"type": "function", "function": {
        "name": "get_weather", "description": "Get today's weather for a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}},
    "calculator": {"type": "function", "function": {
        "name": "calculator", "description": "Evaluate an arithmetic expression",
        "parameters": {"type": "object", "properties": {"expression": {"type": "string"}},
                       "required": ["expression"]}}},
    "convert_unit": {"type": "function", "function": {
        "name": "convert_unit", "description": "Convert a value between units",
        "parameters": {"type": "object", "properties": {
            "value": {"type": "number"}, "from": {"type": "string"}, "to": {"type": "string"}},
            "required": ["value", "from", "to"]}}},
}

SYSTEM_PROMPTS = [
    "You are a helpful assistant. Answer briefly.",
    "You are a math tutor. Show the calculation.",
    "你是一个乐于助人的助手，请简洁地回答。",
    "你是一名翻译，请把用户的话翻译成另一种语言。",
]


# ---- pretraining documents -------------------------------------------------------------------------

def _c_to_f(c: int) -> str:
    f = c * 9 / 5 + 32
    return f"{f:g}"


def _doc_weather(r: random.Random) -> str:
    (en, zh), (w1, z1), (w2, z2) = r.choice(CITIES), r.choice(WEATHER), r.choice(WEATHER)
    lo = r.randint(-5, 20)
    hi = lo + r.randint(3, 12)
    if r.random() < 0.5:
        return (f"Weather report for {en}: today will be {w1}, with a high of {hi} degrees and a low of {lo} "
                f"degrees Celsius. Tomorrow will be {w2}.")
    return f"{zh}天气预报：今天{z1}，最高气温{hi}度，最低气温{lo}度。明天{z2}。"


def _doc_arithmetic(r: random.Random) -> str:
    lines = []
    for _ in range(r.randint(3, 6)):
        a, b = r.randint(0, 999), r.randint(0, 999)
        op = r.choice("+-*")
        val = {"+": a + b, "-": a - b, "*": a * b}[op]
        if r.random() < 0.5:
            lines.append(f"{a} {op} {b} = {val}")
        else:
            word = {"+": "加", "-": "减", "*": "乘以"}[op]
            lines.append(f"{a}{word}{b}等于{val}。")
    return "\n".join(lines)


def _doc_story(r: random.Random) -> str:
    n, m = r.randint(2, 20), r.randint(1, 9)
    item_en, item_zh = r.choice(ITEMS)
    if r.random() < 0.5:
        a, b = r.sample(NAMES_EN, 2)
        return (f"{a} has {n} {item_en}. {b} gives {a} {m} more {item_en}. Now {a} has {n + m} {item_en}. "
                f"If {a} gives away {min(m, n)} {item_en}, {n + m - min(m, n)} {item_en} are left.")
    a, b = r.sample(NAMES_ZH, 2)
    return f"{a}有{n}{item_zh}，{b}又给了{a}{m}{item_zh}，现在{a}一共有{n + m}{item_zh}。"


def _doc_code(r: random.Random) -> str:
    kind = r.randrange(6)
    x = r.randint(2, 12)
    if kind == 0:
        f, a, b = r.choice(["add", "plus", "total"]), r.choice("abxm"), r.choice("cdyn")
        return (f"def {f}({a}, {b}):\n    \"\"\"Return the sum of {a} and {b}.\"\"\"\n    return {a} + {b}\n\n\n"
                f"print({f}({x}, {x + 3}))  # {2 * x + 3}")
    if kind == 1:
        fact = 1
        for i in range(2, x + 1):
            fact *= i
        return ("def factorial(n):\n    result = 1\n    for i in range(2, n + 1):\n        result *= i\n"
                f"    return result\n\n\nprint(factorial({x}))  # {fact}")
    if kind == 2:
        fib = [0, 1]
        while len(fib) < x:
            fib.append(fib[-1] + fib[-2])
        return ("def fibonacci(n):\n    a, b = 0, 1\n    out = []\n    for _ in range(n):\n        out.append(a)\n"
                f"        a, b = b, a + b\n    return out\n\n\nprint(fibonacci({x}))  # {fib[:x]}")
    if kind == 3:
        return ("def is_even(n):\n    return n % 2 == 0\n\n\n"
                f"print(is_even({x}))  # {x % 2 == 0}\nprint(is_even({x + 1}))  # {(x + 1) % 2 == 0}")
    if kind == 4:
        c = r.randint(-10, 40)
        return ("def celsius_to_fahrenheit(c):\n    return c * 9 / 5 + 32\n\n\n"
                f"print(celsius_to_fahrenheit({c}))  # {float(c * 9 / 5 + 32)}")
    xs = [r.randint(0, 99) for _ in range(r.randint(3, 7))]
    return ("def largest(numbers):\n    best = numbers[0]\n    for n in numbers[1:]:\n        if n > best:\n"
            f"            best = n\n    return best\n\n\nprint(largest({xs}))  # {max(xs)}")


def _doc_words(r: random.Random) -> str:
    out = []
    for en, zh in r.sample(WORDS, r.randint(3, 5)):
        out.append(f"The English word \"{en}\" is \"{zh}\" in Chinese." if r.random() < 0.5
                   else f"“{zh}”的英文是“{en}”。")
    return " ".join(out)


def _doc_capitals(r: random.Random) -> str:
    out = []
    for c_en, c_zh, k_en, k_zh in r.sample(CAPITALS, 3):
        out.append(f"The capital of {c_en} is {k_en}." if r.random() < 0.5 else f"{c_zh}的首都是{k_zh}。")
    return " ".join(out)


def _doc_table(r: random.Random) -> str:
    k = r.randint(2, 9)
    return "\n".join(f"{k} × {i} = {k * i}" for i in range(1, 10))


def _doc_units(r: random.Random) -> str:
    out = []
    for _ in range(3):
        f, t, factor, fz, tz = r.choice(UNITS)
        v = r.randint(1, 50)
        out.append(f"{v} {f} is {v * factor} {t}." if r.random() < 0.5 else f"{v}{fz}等于{v * factor}{tz}。")
    c = r.randint(-10, 40)
    out.append(f"{c} degrees Celsius is {_c_to_f(c)} degrees Fahrenheit.")
    return " ".join(out)


PRETRAIN_KINDS = [_doc_weather, _doc_arithmetic, _doc_story, _doc_code, _doc_words, _doc_capitals, _doc_table,
                  _doc_units]


def pretrain_documents(n: int = 640, seed: int = 0) -> list[str]:
    r = random.Random(seed)
    return [PRETRAIN_KINDS[i % len(PRETRAIN_KINDS)](r) for i in range(n)]


# ---- fine-tuning dialogues -------------------------------------------------------------------------

def _sft_arithmetic(r: random.Random) -> dict:
    a, b = r.randint(0, 99), r.randint(0, 99)
    if r.random() < 0.5:
        return {"input": f"What is {a} + {b}?", "output": f"{a} + {b} = {a + b}."}
    return {"input": f"{a}加{b}等于多少？", "output": f"{a}加{b}等于{a + b}。"}


def _sft_translate(r: random.Random) -> dict:
    en, zh = r.choice(WORDS)
    if r.random() < 0.5:
        turns = [("user", f"How do you say \"{en}\" in Chinese?"), ("bot", f"\"{en}\" in Chinese is \"{zh}\".")]
    else:
        turns = [("user", f"“{zh}”用英语怎么说？"), ("bot", f"“{zh}”的英文是“{en}”。")]
    system = {"system": SYSTEM_PROMPTS[3]} if r.random() < 0.3 else {}
    return {**system, "dialog": [{"role": ro, "content": c} for ro, c in turns]}


def _sft_capital(r: random.Random) -> dict:
    c_en, c_zh, k_en, k_zh = r.choice(CAPITALS)
    if r.random() < 0.5:
        turns = [("user", f"What is the capital of {c_en}?"), ("assistant", f"The capital of {c_en} is {k_en}.")]
    else:
        turns = [("user", f"{c_zh}的首都是哪里？"), ("assistant", f"{c_zh}的首都是{k_zh}。")]
    return {"dialog": [{"role": ro, "content": c} for ro, c in turns]}


def _sft_multiturn(r: random.Random) -> dict:
    a, b = r.randint(2, 30), r.randint(2, 30)
    if r.random() < 0.5:
        name = r.choice(NAMES_EN)
        turns = [("user", f"Hello, my name is {name}."), ("bot", f"Hello {name}! How can I help you today?"),
                 ("user", f"Please multiply {a} by {b}."), ("bot", f"{a} × {b} = {a * b}."),
                 ("user", "Thank you!"), ("bot", "You're welcome!")]
    else:
        name = r.choice(NAMES_ZH)
        turns = [("user", f"你好，我叫{name}。"), ("bot", f"你好，{name}！有什么可以帮你的吗？"),
                 ("user", f"请帮我算一下{a}乘以{b}。"), ("bot", f"{a}乘以{b}等于{a * b}。"),
                 ("user", "谢谢！"), ("bot", "不客气！")]
    system = {"system": r.choice(SYSTEM_PROMPTS[:3])} if r.random() < 0.4 else {}
    return {**system, "dialog": [{"role": ro, "content": c} for ro, c in turns]}


def _sft_code(r: random.Random) -> dict:
    k = r.randrange(3)
    if k == 0:
        p = r.randint(2, 5)
        q = f"Write a Python function that raises a number to the power {p}."
        a = f"```python\ndef power_{p}(x):\n    return x ** {p}\n```\nFor example, power_{p}(3) returns {3 ** p}."
    elif k == 1:
        q = "写一个Python函数，判断一个数是不是偶数。"
        a = "```python\ndef is_even(n):\n    return n % 2 == 0\n```\n例如is_even(4)返回True，is_even(7)返回False。"
    else:
        xs = [r.randint(0, 50) for _ in range(4)]
        q = f"How do I sum the list {xs} in Python?"
        a = f"Use the built-in sum function:\n```python\nprint(sum({xs}))  # {sum(xs)}\n```"
    return {"input": q, "output": a}


def _sft_identity(r: random.Random) -> dict:
    if r.random() < 0.5:
        return {"input": "Who are you?",
                "output": "I am TeleChat, an AI assistant developed by China Telecom's AI research team (TeleAI)."}
    return {"input": "你是谁？", "output": "我是星辰语义大模型TeleChat，由中国电信人工智能研究院（TeleAI）研发的人工智能助手。"}


def _weather_result(r: random.Random, city: str) -> dict:
    lo = r.randint(-5, 20)
    return {"city": city, "condition": r.choice(WEATHER)[0], "high": lo + r.randint(3, 12), "low": lo}


def _sft_tool_weather(r: random.Random) -> dict:
    zh = r.random() < 0.5
    two = r.random() < 0.3
    cities = r.sample(CITIES, 2 if two else 1)
    names = [c[1] if zh else c[0] for c in cities]
    if zh:
        question = f"{names[0]}和{names[1]}今天天气怎么样？" if two else f"{names[0]}今天天气怎么样？"
    else:
        question = (f"What's the weather like in {names[0]} and {names[1]} today?" if two
                    else f"What's the weather like in {names[0]} today?")
    results = [_weather_result(r, n) for n in names]
    dialog = [{"role": "user", "content": question},
              {"role": "bot", "content": "", "tool_calls": [{"name": "get_weather", "arguments": {"city": n}}
                                                            for n in names]}]
    dialog += [{"role": "tool", "content": json.dumps(res, ensure_ascii=False)} for res in results]
    zh_cond = dict(WEATHER)
    if zh:
        answer = "；".join(f"{res['city']}今天{zh_cond[res['condition']]}，气温{res['low']}到{res['high']}度"
                          for res in results) + "。"
    else:
        answer = " ".join(f"In {res['city']} it is {res['condition']} today, from {res['low']} to "
                          f"{res['high']} °C." for res in results)
    dialog.append({"role": "bot", "content": answer})
    tools = [TOOLS["get_weather"]] + ([TOOLS["calculator"]] if r.random() < 0.3 else [])
    return {"dialog": dialog, "tools": tools}


def _sft_tool_calculator(r: random.Random) -> dict:
    a, b = r.randint(100, 9999), r.randint(100, 999)
    op = r.choice("+-*")
    val = {"+": a + b, "-": a - b, "*": a * b}[op]
    expr = f"{a} {op} {b}"
    zh = r.random() < 0.5
    question = f"请帮我计算{expr}。" if zh else f"Please compute {expr}."
    answer = f"{expr} 的结果是{val}。" if zh else f"{expr} = {val}."
    dialog = [{"role": "user", "content": question},
              {"role": "bot", "content": "", "tool_calls": [{"name": "calculator", "arguments": {"expression": expr}}]},
              {"role": "tool", "content": json.dumps({"result": val})},
              {"role": "bot", "content": answer}]
    return {"dialog": dialog, "tools": [TOOLS["calculator"]]}


def _sft_tool_units(r: random.Random) -> dict:
    f, t, factor, fz, tz = r.choice(UNITS)
    v = r.randint(1, 90)
    zh = r.random() < 0.5
    question = f"{v}{fz}是多少{tz}？" if zh else f"How many {t} are {v} {f}?"
    answer = f"{v}{fz}等于{v * factor}{tz}。" if zh else f"{v} {f} is {v * factor} {t}."
    dialog = [{"role": "user", "content": question},
              {"role": "bot", "content": "", "tool_calls": [
                  {"name": "convert_unit", "arguments": {"value": v, "from": f, "to": t}}]},
              {"role": "tool", "content": json.dumps({"value": v * factor, "unit": t})},
              {"role": "bot", "content": answer}]
    return {"dialog": dialog, "tools": [TOOLS["convert_unit"], TOOLS["calculator"]]}


def _sft_no_tool_needed(r: random.Random) -> dict:
    # tools are offered but the question does not need one: the model answers directly
    c_en, c_zh, k_en, k_zh = r.choice(CAPITALS)
    dialog = [{"role": "user", "content": f"What is the capital of {c_en}?"},
              {"role": "bot", "content": f"The capital of {c_en} is {k_en}."}]
    return {"system": SYSTEM_PROMPTS[0], "dialog": dialog, "tools": [TOOLS["get_weather"]]}


SFT_KINDS = [_sft_arithmetic, _sft_translate, _sft_capital, _sft_multiturn, _sft_code, _sft_identity,
             _sft_tool_weather, _sft_tool_calculator, _sft_tool_units, _sft_no_tool_needed, _sft_arithmetic,
             _sft_tool_weather]


def sft_dialogues(n: int = 480, seed: int = 1) -> list[dict]:
    r = random.Random(seed)
    return [SFT_KINDS[i % len(SFT_KINDS)](r) for i in range(n)]


def heldout_dialogues(train: list[dict], n: int = 60, seed: int = 2) -> list[dict]:
    """Dialogues of the same kinds drawn with another seed, none identical to one of `train` (the small tables
    make some repeat: the identity answer, capitals, single-word translations)."""
    seen = {json.dumps(d, ensure_ascii=False) for d in train}
    r, out, i = random.Random(seed), [], 0
    while len(out) < n:
        d = SFT_KINDS[i % len(SFT_KINDS)](r)
        i += 1
        if json.dumps(d, ensure_ascii=False) not in seen:
            out.append(d)
    return out


# ---- files ---------------------------------------------------------------------------------------

def _write_jsonl(path: str, rows) -> None:
    with open(path, "w", encoding="utf-8", newline="\n") as fh:
        for row in rows:
            fh.write(json.dumps(row, ensure_ascii=False) + "\n")


def write_samples(out_dir: str) -> dict[str, str]:
    """Write `pretrain.jsonl` (`{"text": ...}` lines), `sft.jsonl` (both TeleChat2 SFT formats) and
    `sft_heldout.jsonl` (60 dialogues drawn with another seed, none identical to a training one, for evaluation;
    the tokenizer is not trained on them)."""
    os.makedirs(out_dir, exist_ok=True)
    paths = {k: os.path.join(out_dir, f"{k}.jsonl") for k in ("pretrain", "sft", "sft_heldout")}
    _write_jsonl(paths["pretrain"], ({"text": t} for t in pretrain_documents()))
    train = sft_dialogues()
    _write_jsonl(paths["sft"], train)
    _write_jsonl(paths["sft_heldout"], heldout_dialogues(train))
    return paths
