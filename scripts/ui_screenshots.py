"""Screenshots of the Prefect UI for docs/images/, taken with a real browser against `make ui`.

    python scripts/ui_screenshots.py NAME URL [--graph LAYOUT] [--click TEXT]... [--wait TEXT] [--scroll-to TEXT]

Needs Playwright's Python package and a Chromium (``CHROMIUM``, default /usr/bin/chromium);
neither is a dependency of the project. ``--graph 'Dependency grid'`` picks that layout of the
run graph and shows it full screen; ``--click`` clicks a tab or button by its text, in order.
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

from playwright.sync_api import sync_playwright

OUT = Path(__file__).resolve().parents[1] / 'docs' / 'images'


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument('name')
    p.add_argument('url')
    p.add_argument('--graph', metavar='LAYOUT')
    p.add_argument('--click', action='append', default=[])
    p.add_argument('--wait', help='text to wait for before the screenshot')
    p.add_argument('--scroll-to', metavar='TEXT', help='scroll until TEXT is in view (a log entry)')
    args = p.parse_args()
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=os.environ.get('CHROMIUM', '/usr/bin/chromium'))
        page = browser.new_page(viewport={'width': 1600, 'height': 1000})
        page.goto(args.url)
        page.wait_for_load_state('networkidle')
        time.sleep(2)
        if args.graph:
            page.get_by_label('Run Graph Options').click()
            page.get_by_text(args.graph, exact=True).click()
            page.keyboard.press('Escape')
            page.get_by_title('Toggle fullscreen (f)').click()
            page.get_by_title('Recenter graph (c)').click()
        for text in args.click:
            page.get_by_text(text, exact=True).first.click()
            page.wait_for_load_state('networkidle')
            time.sleep(1.5)
        if args.wait:
            page.get_by_text(args.wait).first.wait_for(timeout=30_000)
        if args.scroll_to:
            entry = page.get_by_text(args.scroll_to).first
            for _ in range(40):  # the log list loads as it scrolls
                if entry.count() and entry.is_visible():
                    break
                page.mouse.wheel(0, 2000)
                time.sleep(0.5)
            entry.scroll_into_view_if_needed()
            page.mouse.wheel(0, 250)
        time.sleep(3)
        OUT.mkdir(parents=True, exist_ok=True)
        page.screenshot(path=OUT / f'{args.name}.png')
        browser.close()
    print(f'saved {OUT / args.name}.png')


if __name__ == '__main__':
    main()
