/* jobcell dashboard: live refresh of the regions marked data-live-src.
 *
 * Each region's HTML fragment is fetched again every data-live-interval ms and swapped
 * in (the server renders and escapes it). Refresh pauses while the tab is hidden, while
 * the user types in a field or selects text inside the region, and stops for good when
 * a fragment holds [data-live-done] (the job has ended). Without JavaScript every page
 * still works: it just does not update itself.
 */
(function () {
  "use strict";

  var regions = Array.prototype.slice.call(document.querySelectorAll("[data-live-src]"));
  if (!regions.length || !window.fetch) {
    return;
  }
  var statusEl = document.querySelector("[data-live-status]");

  function setStatus(text) {
    if (statusEl) {
      statusEl.hidden = false;
      statusEl.textContent = text;
    }
  }

  function clock() {
    return new Date().toLocaleTimeString();
  }

  function busyInside(el) {
    var active = document.activeElement;
    if (active && el.contains(active) && /^(INPUT|SELECT|TEXTAREA)$/.test(active.tagName)) {
      return true;
    }
    var selection = window.getSelection ? window.getSelection() : null;
    return Boolean(selection && !selection.isCollapsed && selection.anchorNode &&
                   el.contains(selection.anchorNode));
  }

  function Live(el) {
    this.el = el;
    this.src = el.getAttribute("data-live-src");
    this.interval = Math.max(parseInt(el.getAttribute("data-live-interval"), 10) || 3000, 1000);
    this.timer = null;
    this.loading = false;
    this.done = false;
  }

  Live.prototype.schedule = function () {
    var self = this;
    window.clearTimeout(self.timer);
    if (!self.done && !document.hidden) {
      self.timer = window.setTimeout(function () { self.tick(); }, self.interval);
    }
  };

  Live.prototype.tick = function () {
    var self = this;
    if (self.done || document.hidden || self.loading) {
      return;
    }
    if (busyInside(self.el)) {
      self.schedule();
      return;
    }
    self.loading = true;
    window.fetch(self.src, {credentials: "same-origin", cache: "no-store",
                            headers: {"Accept": "text/html"}})
      .then(function (response) {
        var landed = new URL(response.url, window.location.href);
        if (response.redirected && /\/ui\/login$/.test(landed.pathname)) {
          // Logged out or token revoked: log in again, then come back to this page.
          self.done = true;
          window.location.assign(landed.pathname + "?next=" +
            encodeURIComponent(window.location.pathname + window.location.search));
          return null;
        }
        if (!response.ok) {
          throw new Error("HTTP " + response.status);
        }
        return response.text();
      })
      .then(function (html) {
        if (html === null) {
          return;
        }
        self.el.innerHTML = html;
        if (self.el.querySelector("[data-live-done]")) {
          self.done = true;
          setStatus("Finished · updated " + clock());
        } else if (document.hidden) {      // hidden while this fetch was under way
          setStatus("Paused while the tab is hidden");
        } else {
          setStatus("Live · updated " + clock());
        }
      })
      .catch(function (error) {
        setStatus("Live refresh failed (" + error.message + "); retrying");
      })
      .then(function () {
        self.loading = false;
        self.schedule();
      });
  };

  var lives = regions.map(function (el) { return new Live(el); });
  setStatus("Live · updates every " + Math.round(lives[0].interval / 1000) + " s");
  lives.forEach(function (live) { live.schedule(); });

  document.addEventListener("visibilitychange", function () {
    lives.forEach(function (live) {
      if (document.hidden) {
        window.clearTimeout(live.timer);
      } else {
        live.tick();
      }
    });
    if (document.hidden) {
      setStatus("Paused while the tab is hidden");
    }
  });
}());
