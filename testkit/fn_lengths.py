#!/usr/bin/env python3
"""Lists the longest production functions of Rust sources, with their line counts.

Usage: fn_lengths.py [--top N] [--min LINES] [--files] PATH...
  e.g. `python3 testkit/fn_lengths.py --top 10 functions/braze-sync/src`
       `python3 testkit/fn_lengths.py --files --top 10 functions/braze-sync/src` (production lines
       per file)
Production code: every `fn` outside `#[cfg(test)]` items (test modules, test helpers) and outside
`tests/`, `benches/` folders. A function's length runs from its `fn` line to its closing brace.
Comments, strings and char literals are blanked before braces are counted.
"""
import argparse, os, re, sys

def blank(src):
    out = []; i = 0; n = len(src)
    while i < n:
        c = src[i]
        if src.startswith('//', i):
            j = src.find('\n', i); j = n if j < 0 else j
            out.append(' ' * (j - i)); i = j; continue
        if src.startswith('/*', i):
            depth = 1; j = i + 2
            while j < n and depth:
                if src.startswith('/*', j): depth += 1; j += 2
                elif src.startswith('*/', j): depth -= 1; j += 2
                else: j += 1
            out.append(re.sub(r'[^\n]', ' ', src[i:j])); i = j; continue
        m = re.match(r'b?r(#*)"', src[i:i+260])
        if m and (i == 0 or not (src[i-1].isalnum() or src[i-1] == '_')):
            end = '"' + m.group(1); j = src.find(end, i + m.end()); j = n if j < 0 else j + len(end)
            out.append(re.sub(r'[^\n]', ' ', src[i:j])); i = j; continue
        if c == '"':
            j = i + 1
            while j < n and src[j] != '"':
                j += 2 if src[j] == '\\' else 1
            j += 1
            out.append(re.sub(r'[^\n]', ' ', src[i:j])); i = j; continue
        if c == "'":
            m = re.match(r"'(\\.[^']*|[^\\'])'", src[i:i+12])
            if m:
                out.append(' ' * m.end()); i += m.end(); continue
        out.append(c); i += 1
    return ''.join(out)

def match_brace(text, open_at):
    depth = 0
    for k in range(open_at, len(text)):
        if text[k] == '{': depth += 1
        elif text[k] == '}':
            depth -= 1
            if depth == 0: return k
    return len(text) - 1

def test_spans(text):
    spans = []
    for m in re.finditer(r'#\[cfg\((test|all\(test[^\]]*)\)\]', text):
        j = m.end()
        # the next item: its body is the first '{' before a ';' at depth 0
        k = j
        while k < len(text) and text[k] not in '{;': k += 1
        if k < len(text) and text[k] == '{':
            spans.append((m.start(), match_brace(text, k)))
    return spans

def functions(path):
    src = open(path, encoding='utf-8', errors='replace').read()
    text = blank(src)
    skip = test_spans(text)
    line_of = lambda pos: text.count('\n', 0, pos) + 1
    for m in re.finditer(r'\bfn\s+([A-Za-z_][A-Za-z0-9_]*)', text):
        if any(a <= m.start() <= b for a, b in skip): continue
        k = m.end(); paren = 0
        while k < len(text):
            ch = text[k]
            if ch in '(<[': paren += 1
            elif ch in ')>]': paren -= 1
            elif ch == ';' and paren <= 0: k = -1; break
            elif ch == '{' and paren <= 0: break
            k += 1
        if k < 0 or k >= len(text): continue
        end = match_brace(text, k)
        start_line = line_of(m.start())
        yield m.group(1), start_line, line_of(end) - start_line + 1

def main():
    ap = argparse.ArgumentParser()
    ap.add_argument('--top', type=int, default=10)
    ap.add_argument('--min', type=int, default=0)
    ap.add_argument('--files', action='store_true', help='production lines per file instead')
    ap.add_argument('paths', nargs='+')
    a = ap.parse_args()
    rows = []
    for p in a.paths:
        files = [p] if os.path.isfile(p) else [
            os.path.join(d, f) for d, ds, fs in os.walk(p)
            for f in fs if f.endswith('.rs')
            and not set(os.path.relpath(d, p).split(os.sep)) & {'tests', 'benches', 'target'}]
        for f in files:
            if os.path.basename(f) == 'tests.rs': continue
            if a.files:
                src = open(f, encoding='utf-8', errors='replace').read(); text = blank(src)
                test = sum(text.count('\n', x, y) + 1 for x, y in test_spans(text))
                rows.append((src.count('\n') - test, f, '', 0))
            else:
                rows += [(n, f, name, line) for name, line, n in functions(f)]
    rows.sort(key=lambda r: -r[0])
    for n, f, name, line in [r for r in rows if r[0] >= a.min][:a.top]:
        print(f'{n:5}  {f}' if a.files else f'{n:5}  {f}:{line}  {name}')

if __name__ == '__main__':
    main()
