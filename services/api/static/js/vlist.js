// A windowed list: only the rows in view (plus a margin) exist in the DOM, whatever the length.
// Rows have one fixed height; positions are set through CSSOM (allowed by the CSP, unlike
// style attributes).
import { h, clear } from './util.js';

export class VList {
  constructor({ rowHeight, render, label, overscan = 6, className = '' }) {
    this.rowHeight = rowHeight;
    this.renderRow = render;
    this.overscan = overscan;
    this.items = [];
    this.inner = h('div.vlist-inner', { role: 'presentation' });
    this.el = h('div', { class: ['vlist', className], tabindex: '0', role: 'list', 'aria-label': label }, this.inner);
    this.el.addEventListener('scroll', () => this.schedule(), { passive: true });
    this.ro = new ResizeObserver(() => this.schedule());
    this.ro.observe(this.el);
    this.frame = 0;
  }

  setItems(items) { this.items = items; this.schedule(); }

  schedule() {
    if (this.frame) return;
    this.frame = requestAnimationFrame(() => { this.frame = 0; this.draw(); });
  }

  draw() {
    const n = this.items.length;
    this.inner.style.height = `${n * this.rowHeight}px`;
    const top = this.el.scrollTop;
    const height = this.el.clientHeight || 600;
    const first = Math.max(0, Math.floor(top / this.rowHeight) - this.overscan);
    const last = Math.min(n, Math.ceil((top + height) / this.rowHeight) + this.overscan);
    clear(this.inner);
    for (let i = first; i < last; i++) {
      const row = this.renderRow(this.items[i], i);
      row.style.transform = `translateY(${i * this.rowHeight}px)`;
      row.style.height = `${this.rowHeight}px`;
      row.classList.add('vrow');
      row.setAttribute('role', 'listitem');
      row.setAttribute('aria-setsize', String(n));
      row.setAttribute('aria-posinset', String(i + 1));
      this.inner.append(row);
    }
  }

  // Keep what the person is reading in place when `count` rows were inserted above it.
  shiftBy(count) {
    if (count && this.el.scrollTop > 0) this.el.scrollTop += count * this.rowHeight;
  }

  scrollToIndex(i) {
    const y = i * this.rowHeight;
    const top = this.el.scrollTop;
    const height = this.el.clientHeight;
    if (y < top) this.el.scrollTop = y;
    else if (y + this.rowHeight > top + height) this.el.scrollTop = y + this.rowHeight - height;
    this.schedule();
  }

  destroy() { this.ro.disconnect(); cancelAnimationFrame(this.frame); }
}
