// Progressive enhancement for the pay page. Without JavaScript the saved-card form still pays.
(function () {
  "use strict";

  // One press is enough: show that the payment is on its way and prevent a second press.
  Array.prototype.forEach.call(document.querySelectorAll("form.pay"), function (form) {
    form.addEventListener("submit", function () {
      if (form.id === "new-card-form" && !form.elements.setup_intent.value) { return; }
      var button = form.querySelector("button[type=submit]");
      if (button) { button.disabled = true; button.setAttribute("aria-busy", "true"); }
    });
  });

  // The Pay button names the card it will charge: follow the customer's choice.
  var payButton = document.getElementById("pay-button");
  Array.prototype.forEach.call(document.querySelectorAll("input[data-pay-label]"), function (radio) {
    radio.addEventListener("change", function () {
      if (radio.checked && payButton) { payButton.textContent = radio.dataset.payLabel; }
    });
  });

  // A new card: Stripe's card element; card data goes from this page to Stripe only.
  var form = document.getElementById("new-card-form");
  if (!form || typeof window.Stripe !== "function") { return; }
  var status = document.getElementById("new-card-status");
  var button = document.getElementById("new-card-button");
  var stripe = window.Stripe(form.dataset.publishableKey);
  var card = stripe.elements().create("card");
  card.mount("#card-element");
  form.hidden = false;
  var needsJs = document.getElementById("new-card-needs-js");
  if (needsJs) { needsJs.hidden = true; }

  function fail(message) {
    status.textContent = message;
    status.classList.add("error");
    button.disabled = false;
    button.removeAttribute("aria-busy");
  }

  form.addEventListener("submit", function (event) {
    if (form.elements.setup_intent.value) { return; }  // second pass: the real submit
    event.preventDefault();
    button.disabled = true;
    button.setAttribute("aria-busy", "true");
    status.classList.remove("error");
    status.textContent = form.dataset.checking || "…";
    var body = new FormData();
    body.append("csrf", form.elements.csrf.value);
    // Asking for JSON: errors come back as {"error", "message"} (a person or a script that does not
    // ask gets the error pages instead, e.g. "Too many attempts" with 429).
    fetch(form.dataset.setupUrl, { method: "POST", body: body, credentials: "same-origin", headers: { Accept: "application/json" } })
      .then(function (response) {
        return response.json().then(function (data) { return { ok: response.ok, data: data }; });
      })
      .then(function (reply) {
        if (!reply.ok) { throw new Error(reply.data.message || reply.data.error || "error"); }
        return stripe.confirmCardSetup(reply.data.client_secret, { payment_method: { card: card } });
      })
      .then(function (result) {
        if (result.error) { fail(result.error.message || String(result.error)); return; }
        form.elements.setup_intent.value = result.setupIntent.id;
        form.submit();
      })
      .catch(function (error) { fail(error.message); });
  });
})();
